"""The measurement scripts: scripts/eval_edits.py (arguments, no overwriting, a two-seed run on the shapes
world) and scripts/gpu_check.py (its parity checks pass on CPU and catch a broken path)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script("eval_edits")


def test_seed_ranges(script):
    assert script.seed_range("3") == [0, 1, 2]
    assert script.seed_range("100:103") == [100, 101, 102]
    with pytest.raises(argparse.ArgumentTypeError, match="holds no seed"):
        script.seed_range("5:5")


def test_an_existing_json_file_is_refused_and_kept(script, tmp_path, capsys):
    earlier = tmp_path / "edits.json"
    earlier.write_text('{"earlier": true}')
    with pytest.raises(SystemExit) as stop:
        script.main(["--seeds", "1", "--json", str(earlier)])
    assert stop.value.code == 2
    assert "exists; choose a new file" in capsys.readouterr().err
    assert earlier.read_text() == '{"earlier": true}'


@pytest.mark.slow
def test_two_seed_run_writes_every_swap(script, tmp_path, capsys):
    out = tmp_path / "figures" / "edits.json"
    assert script.main(["--seeds", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["colour"]) == {f"{b}->{a}" for _, _, b, a in script.COLOUR_SWAPS} | {"all"}
    assert set(figures["shape"]) == {f"{c} -> {s}" for _, _, c, s in script.SHAPE_SWAPS}
    for name, summary in figures["colour"].items():
        assert 0 < summary["cases"] <= 2 * (len(script.COLOUR_SWAPS) if name == "all" else 1)
        assert 0.0 <= summary["kept"] <= 1.0 and 0.0 <= summary["reprompt_kept"] <= 1.0
    # the world model recolours in every one of 253 swaps over 64 seeds (docs/editing.md)
    assert all(summary["changed"] == 1.0 for name, summary in figures["colour"].items() if name != "all")
    assert "| all |" in capsys.readouterr().out


def test_gpu_check_parity_passes_on_cpu(capsys):
    gpu_check = load_script("gpu_check")
    assert gpu_check.main(["--device", "cpu", "--size", "32", "--skip-bench"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "parity" not in line]
    assert len(rows) == 5 and all(row.endswith("| yes |") for row in rows)


def test_gpu_check_catches_a_broken_path(monkeypatch, capsys):
    import xattn.processor

    gpu_check = load_script("gpu_check")
    monkeypatch.setattr(xattn.processor, "_borrow_maps", lambda active, q, k, mask: (q, k, mask))  # ignores map_rows
    assert gpu_check.main(["--device", "cpu", "--size", "32", "--skip-bench"]) == 1
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert rows["fused map_rows (self injection) vs copied map"].endswith("| NO |")
    assert rows["no hooks vs stock"].endswith("| yes |")  # only the broken path is flagged


def test_train_world_runs_its_first_steps_through_xattn_hooks(tmp_path):
    """A few VAE and UNet steps of the shapes-world recipe, with the grounding maps read by an xattn hook."""
    import re
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(SCRIPTS / "train_world.py"), "--dir", str(tmp_path / "run"),
                             "--pool", "32", "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "3",
                             "--batch", "4", "--minutes", "3", "--log-every", "1"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    steps = re.findall(r"unet step \d+/3 diff ([\d.]+) share ([\d.]+) bce ([\d.]+)", result.stdout + result.stderr)
    assert len(steps) == 3
    for diff, share, bce in steps:  # the grounding terms are real numbers from real maps
        assert 0 < float(share) <= 1 and 0 < float(bce) < 10 and float(diff) > 0


def test_a_guidance_pass_on_sd_layout_stops_after_its_last_map(capsys):
    """scripts/bench_guide_pass.py on a narrow SD 1.5 layout: stopped passes never reach the UNet's last layer."""
    import torch

    grad = torch.autograd.grad
    bench = load_script("bench_guide_pass")
    assert bench.main(["--widths", "32,64,64,64", "--size", "256", "--rounds", "1", "--threads", "1"]) == 0
    assert torch.autograd.grad is grad  # its timers are gone
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("whole ", "stopped "))}
    assert rows["whole"][-1] == "3" and rows["stopped"][-1] == "1"  # of 3 passes, only the run's first


def test_probe_binding_prints_a_row_per_probe_and_gives_the_pipeline_back(capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    pipes = []
    load = StableDiffusionPipeline.from_pretrained
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pipes.append(load(*a, **k)) or pipes[-1]))
    probe = load_script("probe_binding")
    assert probe.main(["--probes", "plain,mask-nouns", "--captions", "1", "--seeds", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["plain", "mask-nouns"]
    assert all(0.0 <= float(value) <= 1.0 for row in rows for value in row[1:5])
    assert {type(p).__name__ for p in pipes[0].unet.attn_processors.values()} == {"AttnProcessor2_0"}
    with pytest.raises(SystemExit) as stop:
        probe.main(["--probes", "plain,everything"])
    assert stop.value.code == 2 and "unknown probes ['everything']" in capsys.readouterr().err


def test_bench_world_steps_prints_its_ratios_and_puts_the_signature_back(capsys):
    from xattn.processor import XattnProcessor

    stored = XattnProcessor.__call__.__signature__
    assert load_script("bench_world_steps").main(["--rounds", "1"]) == 0
    assert XattnProcessor.__call__.__signature__ is stored
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("stock", "xattn"))]
    assert len(rows) == 3 and float(rows[0].split()[-1]) == 1.0

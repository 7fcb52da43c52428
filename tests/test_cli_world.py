"""The CLI on the embedded shapes-world model (default --model). Needs src/xattn/world/model/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xattn import runner
from xattn.world import model_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.slow


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_defaults_to_the_world_model_and_repeats_exactly(cli, tmp_path):
    for out in ("a", "b"):
        result = cli("generate", "a red circle and a blue square", "--seed", 3, "--out", out, "--no-progress")
        assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "a" / "image-0.png"), pixels(tmp_path / "b" / "image-0.png"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["model"]["path"] == str(model_path())
    defaults = runner.model_defaults(model_path())
    with Image.open(tmp_path / "a" / "image-0.png") as image:
        expected = runner.parse_size(defaults.get("size", 64))
        assert image.size == expected
    if "steps" in defaults:
        assert manifest["settings"]["steps"] == defaults["steps"]


def test_png_round_trip_on_the_world_model(cli, tmp_path):
    assert cli("generate", "a green triangle", "--seed", 1, "--steps", 5, "--out", "a", "--no-progress").exit_code == 0
    result = cli("generate", "--from-png", tmp_path / "a" / "image-0.png", "--out", "b", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "a" / "image-0.png"), pixels(tmp_path / "b" / "image-0.png"))


def test_sites_of_the_world_model(cli):
    result = cli("sites")
    assert result.exit_code == 0, result.output
    rows = result.stdout.strip().splitlines()[2:]
    assert any(row.split()[1] == "cross" for row in rows)


def test_shapes_world_preset_runs(cli, tmp_path):
    result = cli("generate", "a red circle", "--config", CONFIGS / "shapes-world.yaml", "--steps", 3,
                 "--out", "o", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["settings"]["scheduler"] == "ddim"


def test_unknown_word_in_a_world_sweep(cli, tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text((CONFIGS / "sweep-example.yaml").read_text().replace("words: [red]", "words: [purple]"))
    result = cli("sweep", config, "--no-progress")
    assert result.exit_code == 2 and "purple" in result.output


def test_example_sweep_completes_on_the_world_model(cli, tmp_path):
    result = cli("sweep", CONFIGS / "sweep-example.yaml", "--steps", 3, "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output
    plan = [e["job"] for e in json.loads((tmp_path / "run" / "plan.json").read_text())["jobs"]]
    done = [json.loads(line)["job"] for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert done == plan and len(plan) >= 8


def test_example_sweep_under_accelerate_two_processes(tmp_path):
    """The documented line, with the torchrun launcher: the union of both ranks is the grid, each once."""
    import os
    import socket
    import subprocess
    import sys
    from collections import Counter

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "xattn", "sweep", str(CONFIGS / "sweep-example.yaml"),
               "--steps", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = [e["job"] for e in json.loads((tmp_path / "run" / "plan.json").read_text())["jobs"]]
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert Counter(r["job"] for r in records) == Counter(plan) and len(plan) >= 8
    assert {r["rank"] for r in records} == {0, 1}

"""scripts/eval_edits.py: its arguments, its refusal to overwrite, and a two-seed run on the shapes world."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_edits.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("eval_edits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

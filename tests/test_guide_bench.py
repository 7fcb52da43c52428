"""scripts/bench_guidance.py: it gives both guided runs the same work, counts it, and refuses what it cannot match."""

from __future__ import annotations

import json

import pytest
from test_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_guidance")


def test_token_indices_are_the_slots_the_tokenizer_gives(bench, world_pipe):
    tokenizer = world_pipe.tokenizer
    prompt = "a red circle and a blue square"
    slots = bench.token_indices(tokenizer, prompt, ["circle", "square"])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
    assert [tokens[s].removesuffix("</w>") for s in slots] == ["circle", "square"]


def test_thresholds(bench):
    assert bench.parse_thresholds("0:0.05,5:0.5") == {0: 0.05, 5: 0.5}
    assert bench.parse_thresholds("none") == {}


def test_thresholds_outside_the_window_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--window", "3", "--thresholds", "5:0.5"])
    assert "window" in capsys.readouterr().err


def test_a_run_counts_the_passes_each_algorithm_takes(bench, tmp_path):
    """Without refinement, Attend-and-Excite takes one gradient pass per image at each step of its window;
    diffusers' pipeline takes one at every step (it computes the loss after the window too)."""
    out = tmp_path / "bench.json"
    assert bench.main(["--rounds", "1", "--images", "1", "--window", "2", "--thresholds", "none",
                       "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    passes = record["passes"]
    assert passes["plain"] == {"grad": 0, "plain": 50}  # 25 steps, a CFG pair each
    assert passes["xattn Guide(Excite)"] == {"grad": 2, "plain": 50}
    assert passes["diffusers A&E"] == {"grad": 25, "plain": 50}
    assert record["changed"]["xattn Guide(Excite)"] > 0 and record["changed"]["diffusers A&E"] > 0
    with pytest.raises(SystemExit):  # a result is never overwritten
        bench.main(["--rounds", "1", "--json", str(out)])

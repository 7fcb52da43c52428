"""Weighted prompts everywhere in the CLI: generate and maps weight the word, positive and negative.

Reference: ``xattn reweight --mode embedding`` (A1111's emphasis at the
attention level, tested elsewhere to equal it) on the same prompt and seed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xattn.app.pngmeta import read_parameters
from xattn.cli import app

FAST = ["--steps", "2", "--seed", "3", "--no-progress"]
PROMPT = "a (red:1.5) circle and a blue square"


@pytest.fixture
def cli(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    return invoke


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_generate_weights_the_word_as_a1111_emphasis_and_keeps_the_prompt_as_written(cli, tmp_path):
    cli("generate", PROMPT, *FAST, "--out", tmp_path / "weighted")
    cli("generate", "a red circle and a blue square", *FAST, "--out", tmp_path / "plain")
    cli("reweight", PROMPT, "--mode", "embedding", *FAST, "--out", tmp_path / "emphasis")
    weighted = pixels(tmp_path / "weighted" / "image-0.png")
    assert np.abs(weighted - pixels(tmp_path / "plain" / "image-0.png")).max() > 0  # the weight did something
    reference = pixels(tmp_path / "emphasis" / "embedding_prompt_seed3.png")
    assert np.abs(weighted - reference).max() <= 2  # the same emphasis, applied once instead of at every site
    assert read_parameters(tmp_path / "weighted" / "image-0.png")["prompt"] == PROMPT
    cli("generate", "--from-png", tmp_path / "weighted" / "image-0.png", "--no-progress", "--out", tmp_path / "again")
    assert np.array_equal(pixels(tmp_path / "again" / "image-0.png"), weighted)


def test_a_weighted_negative_prompt_is_weighted_too(cli, tmp_path):
    cli("generate", "a red circle", "-n", "(blue square:1.6)", *FAST, "--out", tmp_path / "weighted")
    cli("generate", "a red circle", "-n", "blue square", *FAST, "--out", tmp_path / "plain")
    cli("generate", "a red circle", "-n", "(blue square)", *FAST, "--out", tmp_path / "small")
    weighted = pixels(tmp_path / "weighted" / "image-0.png")
    assert np.abs(weighted - pixels(tmp_path / "plain" / "image-0.png")).max() > 0
    assert np.abs(weighted - pixels(tmp_path / "small" / "image-0.png")).max() > 0
    assert read_parameters(tmp_path / "weighted" / "image-0.png")["negative_prompt"] == "(blue square:1.6)"


def test_maps_of_a_weighted_prompt_names_the_clean_words(cli, tmp_path):
    cli("maps", PROMPT, "-t", "red", *FAST, "--out", tmp_path / "maps")
    cli("generate", PROMPT, *FAST, "--out", tmp_path / "weighted")
    manifest = json.loads((tmp_path / "maps" / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert read_parameters(tmp_path / "maps" / "image-0.png")["prompt"] == PROMPT
    made = pixels(tmp_path / "maps" / "image-0.png")
    assert np.abs(made - pixels(tmp_path / "weighted" / "image-0.png")).max() <= 2  # weighted as generate weights


def test_a_sweep_weights_its_prompts_like_generate(cli, tmp_path):
    import xattn

    config = tmp_path / "s.yaml"
    config.write_text("\n".join([
        "job: generate", f"model: {xattn.world.model_path()}", "steps: 2", "size: 64", "guidance: 4.0",
        "negative_prompt: \"(yellow:1.3)\"", "grid:", f"  prompts: {json.dumps([PROMPT])}", "  seeds: [3]"]) + "\n")
    cli("sweep", config, "--out", tmp_path / "sweep", "--no-progress")
    cli("generate", PROMPT, "-n", "(yellow:1.3)", *FAST, "--size", "64", "--guidance", "4",
        "--out", tmp_path / "generate")
    (record,) = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert np.array_equal(pixels(tmp_path / "sweep" / record["image"]),
                          pixels(tmp_path / "generate" / "image-0.png"))


def test_reweight_sends_its_clean_prompt_as_is_even_with_brackets_in_it(cli, tmp_path):
    """``\\(big\\)`` is the clean text ``(big)``: it must not be read as a weighted group a second time."""
    cli("reweight", r"a \(big\) (red:1.5) circle", "-n", "(blue:1.3)", *FAST, "--out", tmp_path / "run")
    params = read_parameters(tmp_path / "run" / "scale_prompt_seed3.png")
    assert params["prompt"] == "a (big) red circle" and params["xattn"]["reweight"]["weights"] == {"red": 1.5}


# A prompt both dialects read, meaning different things: compel's ``++`` is x1.1 twice, A1111 reads it as text;
# A1111's ``(cat)`` is x1.1, compel's plain parentheses only group.
BOTH = [("a cat++", {"cat": 1.1**2}, {}), ("a (cat) playing", {}, {"cat": 1.1}),
        ("a (red circle)1.5", {"red": 1.5, "circle": 1.5}, {"red": 1.1})]  # A1111: "circle1.5" is one word


@pytest.mark.parametrize("prompt, compel_weights, a1111_weights", BOTH, ids=[case[0] for case in BOTH])
def test_the_dialects_weight_the_same_prompt_differently(prompt, compel_weights, a1111_weights):
    from xattn.prompts import parse_prompt

    compel, a1111 = parse_prompt(prompt, syntax="compel"), parse_prompt(prompt, syntax="a1111")
    assert compel.weights() == pytest.approx(compel_weights, rel=1e-12)
    assert a1111.weights() == pytest.approx(a1111_weights, rel=1e-12)
    assert compel.weights() != a1111.weights()
    assert parse_prompt(prompt).weights() == a1111.weights()  # A1111 stays the default


@pytest.mark.parametrize("prompt", [case[0] for case in BOTH])
def test_compel_dialect_weights_equal_compels_own(prompt):
    compel_parser = pytest.importorskip("compel.prompt_parser")
    from xattn.prompts import parse_prompt

    oracle = compel_parser.PromptParser().parse_conjunction(prompt).prompts[0].children
    expected = [(word, fragment.weight) for fragment in oracle for word in fragment.text.split()]
    got = [(word, fragment.weight) for fragment in parse_prompt(prompt, syntax="compel").fragments
           for word in fragment.text.replace("+", " ").split()]
    assert [word for word, _ in got] == [word for word, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_syntax_option_chooses_the_dialect_and_is_recorded(cli, tmp_path):
    prompt = "a red++ circle and a blue square"
    cli("generate", prompt, *FAST, "--out", tmp_path / "default")
    cli("generate", prompt, "--syntax", "a1111", *FAST, "--out", tmp_path / "a1111")
    cli("generate", prompt, "--syntax", "compel", *FAST, "--out", tmp_path / "compel")
    (tmp_path / "c.yaml").write_text("syntax: compel\n")
    cli("generate", prompt, "-c", tmp_path / "c.yaml", *FAST, "--out", tmp_path / "config")
    compel = pixels(tmp_path / "compel" / "image-0.png")
    assert np.array_equal(pixels(tmp_path / "default" / "image-0.png"), pixels(tmp_path / "a1111" / "image-0.png"))
    assert np.abs(compel - pixels(tmp_path / "a1111" / "image-0.png")).max() > 0  # red x1.21 only in compel
    assert np.array_equal(pixels(tmp_path / "config" / "image-0.png"), compel)
    for name, syntax in [("default", "a1111"), ("a1111", "a1111"), ("compel", "compel"), ("config", "compel")]:
        assert json.loads((tmp_path / name / "manifest.json").read_text())["settings"]["syntax"] == syntax
    png = read_parameters(tmp_path / "compel" / "image-0.png")
    assert png["prompt"] == prompt and png["xattn"]["syntax"] == "compel"
    cli("generate", "--from-png", tmp_path / "compel" / "image-0.png", "--no-progress", "--out", tmp_path / "again")
    assert np.array_equal(pixels(tmp_path / "again" / "image-0.png"), compel)
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["settings"]["syntax"] == "compel"


def test_reweight_reads_the_prompt_in_its_syntax(cli, tmp_path):
    cli("reweight", "a red++ circle", "--syntax", "compel", *FAST, "--out", tmp_path / "compel")
    cli("reweight", "a (red) circle", *FAST, "--out", tmp_path / "a1111")
    compel = read_parameters(tmp_path / "compel" / "scale_prompt_seed3.png")
    assert compel["prompt"] == "a red circle" and compel["xattn"]["reweight"]["weights"] == pytest.approx({"red": 1.21})
    a1111 = read_parameters(tmp_path / "a1111" / "scale_prompt_seed3.png")
    assert a1111["xattn"]["reweight"]["weights"] == pytest.approx({"red": 1.1})
    assert json.loads((tmp_path / "compel" / "manifest.json").read_text())["settings"]["syntax"] == "compel"

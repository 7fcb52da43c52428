"""`xattn generate --excite / --bind / --box`: guidance from the command line, recorded for --from-png."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image



def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_a_box_from_the_cli_puts_the_object_in_it_and_from_png_repeats_it(cli, tmp_path):
    from xattn.world import measure

    for seed, box, left in [(0, "0,0,0.5,1", True), (1, "0.5,0,1,1", False)]:
        out = tmp_path / f"box-{seed}"
        result = cli("generate", "a red circle", "--box", f"red circle={box}", "--seed", seed, "--out", out,
                     "--no-progress")
        assert result.exit_code == 0, result.output
        mask = measure.object_mask(_pixels(out / "image-0.png"), "red")
        x = measure.centroid(mask)[1]
        assert (x < mask.shape[1] / 2) == left
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["guide"]["guide"][0]["boxes"] == {"red circle": [float(v) for v in box.split(",")]}
    again = tmp_path / "again"
    result = cli("generate", "--from-png", tmp_path / "box-1" / "image-0.png", "--out", again, "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(_pixels(again / "image-0.png"), _pixels(tmp_path / "box-1" / "image-0.png"))


@pytest.mark.parametrize("args, message", [
    (["--bind", "red"], "modifier=noun"),
    (["--box", "red circle=0,0,2,1"], "fractions in 0..1"),
    (["--box", "red circle"], "phrase=x0,y0,x1,y1"),
    (["--guide-steps", "0.5"], "need a loss"),
    (["--excite", "circle", "--guide-step-size", "nan"], "step_size must be a finite number, not nan"),
    (["--excite", "circle", "--guide-step-size", "inf"], "step_size must be a finite number, not inf"),
    (["--excite", "circle", "--guide-step-size", "1e39"], "out of float32 range"),
    (["--excite", "circle", "--guide-step-size", "0"], "step_size must be a positive"),
    (["--box", "red circle=0,0,nan,1"], "must be a finite number, not nan"),
    (["--box", "red circle=0,0,inf,1"], "must be a finite number, not inf"),
    (["--excite", "circle", "--guide-steps", "3:4"], "holds no step of this 2-step run"),
    (["--excite", "circle", "--guide-steps", "nan"], "Guide"),
    (["--excite", "hat"], "hat"),
])
def test_bad_guidance_options_are_one_error_line(cli, tmp_path, args, message):
    out = tmp_path / "bad"
    result = cli("generate", "a red circle", *args, "--steps", "2", "--out", out, "--no-progress")
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and message in result.output and "Traceback" not in result.output
    assert not out.exists() or not any(p.suffix == ".png" for p in out.iterdir())


def test_guidance_resolves_the_words_of_a_weighted_prompt(cli, tmp_path):
    """A weighted prompt reaches the pipeline as embeddings: the session is told its words, for either dialect."""
    for syntax, prompt in [("a1111", "a (red:1.3) circle"), ("compel", "a red+ circle")]:
        out = tmp_path / syntax
        result = cli("generate", prompt, "--syntax", syntax, "--excite", "circle", "--steps", "2", "--out", out,
                     "--no-progress")
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["settings"]["syntax"] == syntax and manifest["guide"]["guide"][0]["words"] == ["circle"]


def _documented_commands():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "guidance.md").read_text()
    return re.findall(r"^xattn generate .*$", text, re.M)


def test_the_guidance_doc_shows_box_commands():
    assert len(_documented_commands()) >= 2 and all("--box" in c for c in _documented_commands())


@pytest.mark.slow
@pytest.mark.parametrize("command", _documented_commands())
def test_a_documented_guidance_command_puts_the_object_in_its_box(command, cli, tmp_path):
    import re
    import shlex

    from xattn.world import measure

    result = cli(*shlex.split(command)[1:], "--no-progress")
    assert result.exit_code == 0, result.output
    folder = tmp_path / re.findall(r"wrote (\S+)", result.output)[-1]
    prompt = shlex.split(command)[2]
    (colour, _), = measure.object_words(prompt)
    phrase, box = shlex.split(command)[shlex.split(command).index("--box") + 1].rsplit("=", 1)
    x0, y0, x1, y1 = (float(v) for v in box.split(","))
    mask = measure.object_mask(_pixels(folder / "image-0.png"), colour)
    y, x = measure.centroid(mask)
    height, width = mask.shape
    assert x0 * width <= x < x1 * width and y0 * height <= y < y1 * height

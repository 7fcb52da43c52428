"""`xattn generate --excite / --bind / --box / --focus`: guidance from the command line, recorded for --from-png."""

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
    (["--focus", "hat"], "hat"),
    (["--focus-radius", "0.3"], "--focus-radius needs --focus"),
    (["--guide-refine", "0:0.5"], "need a loss"),
    (["--excite", "circle", "--guide-refine", "x:1"], "STEP:TARGET"),
    (["--excite", "circle", "--guide-refine", "²:1"], "STEP:TARGET"),
    (["--excite", "circle", "--guide-refine", "0:nan"], "must be a finite number, not 'nan'"),
    (["--excite", "circle", "--guide-refine", "0:-1"], "the smallest loss Excite can reach"),
    (["--excite", "circle", "--guide-refine", "1:0.5"], "refine steps [1] lie outside the steps it guides"),
    (["--excite", ""], "Excite needs one or more words"),  # an empty option is refused, never skipped
    (["--excite", " , "], "Excite needs one or more words"),
    (["--bind", ""], "modifier=noun"),
    (["--focus", ""], "Focus needs one or more words"),
    (["--box", ""], "phrase=x0,y0,x1,y1"),
    (["--focus", "red,circle", "--focus-radius", "3"], "Focus radius must be a fraction"),
    (["--focus", "red,circle", "--focus-radius", "nan"], "must be a finite number, not nan"),
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


def test_the_guidance_doc_shows_box_and_focus_commands():
    commands = _documented_commands()
    assert sum("--box" in c for c in commands) >= 2 and sum("--focus" in c for c in commands) >= 1
    assert all("--box" in c or "--focus" in c for c in commands)


def _objects(path) -> int:
    from xattn.world import measure

    blobs = measure.components(measure.foreground(_pixels(path)))
    return sum(int(blob.sum() >= measure.MIN_BLOB) for blob in blobs)


@pytest.mark.slow
@pytest.mark.parametrize("command", _documented_commands())
def test_a_documented_guidance_command_draws_what_it_says(command, cli, tmp_path):
    """A --box command puts the object in its box; a --focus command draws one object where plain sampling drew more."""
    import re
    import shlex

    from xattn.world import measure

    words = shlex.split(command)
    result = cli(*words[1:], "--no-progress")
    assert result.exit_code == 0, result.output
    folder = tmp_path / re.findall(r"wrote (\S+)", result.output)[-1]
    prompt = words[2]
    (colour, shape), = measure.object_words(prompt)
    if "--focus" in words:
        at = words.index("--focus")
        plain = cli(*words[1:at], *words[at + 2:], "--out", "plain", "--no-progress")
        assert plain.exit_code == 0, plain.output
        assert _objects(tmp_path / "plain" / "image-0.png") > 1  # the example shows a fix, not a no-op
        assert _objects(folder / "image-0.png") == 1
        image = _pixels(folder / "image-0.png")
        assert measure.dominant_color(image) == colour and measure.classify_shape(measure.foreground(image)) == shape
        return
    phrase, box = words[words.index("--box") + 1].rsplit("=", 1)
    x0, y0, x1, y1 = (float(v) for v in box.split(","))
    mask = measure.object_mask(_pixels(folder / "image-0.png"), colour)
    y, x = measure.centroid(mask)
    height, width = mask.shape
    assert x0 * width <= x < x1 * width and y0 * height <= y < y1 * height


# -- guidance in a YAML config (`guide:`), on the tiny SD1 pipeline ---------------------------------

FAST = ["--steps", "2", "--size", "32", "--seed", "3", "--no-progress"]
TYPED = ["--excite", "red,circle", "--box", "red circle=0,0,0.5,1", "--guide-steps", "0:1", "--guide-step-size", "5"]
CONFIG_GUIDE = """guide:
  excite: [red, circle]
  box: {red circle: [0, 0, 0.5, 1]}
  steps: "0:1"
  step_size: 5
"""


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_config_guidance_makes_the_image_the_typed_options_make(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG_GUIDE)
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--out", "config", *FAST)
    assert result.exit_code == 0, result.output
    result = cli("generate", "a red circle", "--model", sd1_path, *TYPED, "--out", "typed", *FAST)
    assert result.exit_code == 0, result.output
    result = cli("generate", "a red circle", "--model", sd1_path, "--out", "plain", *FAST)
    assert result.exit_code == 0, result.output
    image = _pixels(tmp_path / "config" / "image-0.png")
    assert np.array_equal(image, _pixels(tmp_path / "typed" / "image-0.png"))
    assert not np.array_equal(image, _pixels(tmp_path / "plain" / "image-0.png"))  # the guidance did something
    manifest = _manifest(tmp_path / "config")
    assert manifest["guide"] == _manifest(tmp_path / "typed")["guide"]
    assert "guide" not in manifest["settings"]  # the manifest's guide is the one used, recorded once
    from xattn.app import pngmeta

    assert pngmeta.read_parameters(tmp_path / "config" / "image-0.png")["xattn"]["guide"] == manifest["guide"]
    again = cli("generate", "--from-png", tmp_path / "config" / "image-0.png", "--out", "again", "--no-progress")
    assert again.exit_code == 0, again.output
    assert np.array_equal(image, _pixels(tmp_path / "again" / "image-0.png"))


def test_the_command_lines_spellings_work_in_a_config(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text('guide: {excite: "red,circle", box: "red circle=0,0,0.5,1", steps: "0:1", '
                                     "step_size: 5.0}\n")
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--out", "text", *FAST)
    assert result.exit_code == 0, result.output
    result = cli("generate", "a red circle", "--model", sd1_path, *TYPED, "--out", "typed", *FAST)
    assert result.exit_code == 0, result.output
    assert np.array_equal(_pixels(tmp_path / "text" / "image-0.png"), _pixels(tmp_path / "typed" / "image-0.png"))


def test_focus_from_a_config_in_each_spelling_makes_the_typed_options_image(cli, sd1_path, tmp_path):
    typed = cli("generate", "a red circle", "--model", sd1_path, "--focus", "red,circle", "--focus-radius", "0.3",
                "--guide-steps", "0:1", "--guide-step-size", "5", "--out", "typed", *FAST)
    assert typed.exit_code == 0, typed.output
    (loss,) = _manifest(tmp_path / "typed")["guide"]["guide"]
    assert loss == {"loss": "focus", "words": ["red", "circle"], "radius": 0.3, "weight": 1.0}
    image = _pixels(tmp_path / "typed" / "image-0.png")
    plain = cli("generate", "a red circle", "--model", sd1_path, "--out", "plain", *FAST)
    assert plain.exit_code == 0, plain.output
    assert not np.array_equal(image, _pixels(tmp_path / "plain" / "image-0.png"))  # the guidance did something
    _assert_configs_and_png_repeat(cli, sd1_path, tmp_path, image, {
        name: f'guide: {{focus: {focus}, steps: "0:1", step_size: 5}}\n'
        for name, focus in [("list", "{words: [red, circle], radius: 0.3}"),
                            ("text", '{words: "red,circle", radius: 0.3}')]})


def _assert_configs_and_png_repeat(cli, sd1_path, tmp_path, image, configs: dict[str, str]) -> None:
    """Each config (name -> YAML) makes ``image``, the typed run's in ``typed/``, and so does its --from-png."""
    for name, text in configs.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        result = cli("generate", "a red circle", "--model", sd1_path, "--config", f"{name}.yaml", "--out", name, *FAST)
        assert result.exit_code == 0, result.output
        assert np.array_equal(image, _pixels(tmp_path / name / "image-0.png")), name
    again = cli("generate", "--from-png", tmp_path / "typed" / "image-0.png", "--out", "again", "--no-progress")
    assert again.exit_code == 0, again.output
    assert np.array_equal(image, _pixels(tmp_path / "again" / "image-0.png"))


def test_refinement_from_the_command_line_and_a_config_is_recorded_and_repeated(cli, sd1_path, tmp_path):
    """--guide-refine 0:0 (a target Excite cannot reach) repeats step 0 up to 20 times: another image than one
    pass; the config's mapping and text spellings give the same, and --from-png repeats it."""
    guide = ["--excite", "red,circle", "--guide-steps", "0:1", "--guide-step-size", "5"]
    typed = cli("generate", "a red circle", "--model", sd1_path, *guide, "--guide-refine", "0:0", "--out", "typed",
                *FAST)
    assert typed.exit_code == 0, typed.output
    record = _manifest(tmp_path / "typed")["guide"]
    assert record["refine"] == {"0": 0.0} and record["max_refine"] == 20
    image = _pixels(tmp_path / "typed" / "image-0.png")
    once = cli("generate", "a red circle", "--model", sd1_path, *guide, "--out", "once", *FAST)
    assert once.exit_code == 0, once.output
    assert not np.array_equal(image, _pixels(tmp_path / "once" / "image-0.png"))  # the repeats moved the latents
    _assert_configs_and_png_repeat(cli, sd1_path, tmp_path, image, {
        name: f'guide: {{excite: [red, circle], steps: "0:1", step_size: 5, refine: {refine}}}\n'
        for name, refine in [("mapping", "{0: 0}"), ("text", '"0:0"')]})


def test_a_typed_guidance_option_replaces_the_configs_guidance(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG_GUIDE)
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--bind", "red=circle",
                 "--out", "replaced", *FAST)
    assert result.exit_code == 0, result.output
    result = cli("generate", "a red circle", "--model", sd1_path, "--bind", "red=circle", "--out", "typed", *FAST)
    assert result.exit_code == 0, result.output
    assert np.array_equal(_pixels(tmp_path / "replaced" / "image-0.png"), _pixels(tmp_path / "typed" / "image-0.png"))
    (loss,) = _manifest(tmp_path / "replaced")["guide"]["guide"]  # not merged with the config's excite and box
    assert loss == {"loss": "bind", "pairs": {"red": "circle"}, "weight": 1.0}
    # a window alone replaces it too, and alone names no loss: refused as on the command line
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--guide-steps", "0:1",
                 "--out", "window", *FAST)
    assert result.exit_code == 2 and "need a loss" in result.output


@pytest.mark.parametrize("guide, key, message", [
    ("{excite: circle, step_size: .nan}", "guide.step_size", "step_size must be a finite number, not nan"),
    ("{excite: circle, step_size: .inf}", "guide.step_size", "step_size must be a finite number, not inf"),
    ("{excite: circle, step_size: 1e39}", "guide.step_size", "out of float32 range"),
    ("{excite: circle, step_size: 0}", "guide.step_size", "step_size must be a positive"),
    ("{box: {red circle: [0, 0, .nan, 1]}}", "guide.box", "must be a finite number, not nan"),
    ("{box: {red circle: [0, 0, 2, 1]}}", "guide.box", "fractions in 0..1"),
    ("{box: {red circle: [0, 0, 1]}}", "guide.box", "[x0, y0, x1, y1]"),
    ("{bind: red}", "guide.bind", "modifier=noun"),
    ("{bind: {red: 3}}", "guide.bind", "modifier: noun"),
    ("{excite: []}", "guide.excite", "a list of words"),
    ("{steps: 0.5}", "guide.steps", "needs a loss"),
    ("{excite: circle, steps: 2:10}", "guide.steps", "quoted"),
    ("{excite: circle, steps: nan}", "guide.steps", "Guide"),
    ("{exite: circle}", "guide.exite", "guide keys are excite, bind, box, focus, steps, step_size"),
    ("{focus: 3}", "guide.focus", "a list of words"),
    ("{focus: {words: [red], radius: 5}}", "guide.focus", "Focus radius must be a fraction"),
    ("{focus: {words: [red], radius: big}}", "guide.focus", "a radius that is a number"),
    ("{focus: {word: [red]}}", "guide.focus", "radius: 0.35"),
    ("circle", "guide", "must be a mapping"),
])
def test_bad_config_guidance_is_one_error_line_naming_the_key(cli, sd1_path, tmp_path, guide, key, message):
    (tmp_path / "c.yaml").write_text(f"guide: {guide}\n")
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--out", "bad", *FAST)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    assert "c.yaml: " in result.output and f"key '{key}'" in result.output and message in result.output
    assert not (tmp_path / "bad").exists()  # refused when the file is read, before the model loads


def test_config_guidance_whose_window_holds_no_step_is_refused(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text('guide: {excite: circle, steps: "3:4"}\n')
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--out", "bad", *FAST)
    assert result.exit_code == 2 and "guide.steps" in result.output and "holds no step of this 2-step run" in result.output
    (tmp_path / "r.yaml").write_text('guide: {excite: circle, steps: "0:1", refine: {1: 0.5}}\n')
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "r.yaml", "--out", "refine", *FAST)
    assert result.exit_code == 2 and "refine steps [1] lie outside" in result.output, result.output
    assert not (tmp_path / "refine").exists() or not any((tmp_path / "refine").glob("*.png"))


def test_guidance_options_at_the_top_of_a_config_point_to_guide(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text("excite: circle\n")
    result = cli("generate", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--out", "bad", *FAST)
    assert result.exit_code == 2 and "unknown key 'excite'" in result.output and "guide:" in result.output


def test_commands_that_do_not_guide_drop_the_configs_guidance_with_a_note(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG_GUIDE)
    result = cli("reweight", "a red circle", "--model", sd1_path, "--config", "c.yaml", "--word", "red",
                 "--weights", "2", "--out", "r", *FAST)
    assert result.exit_code == 0, result.output
    note = "key 'guide' is for other commands"
    assert result.output.count(note) == 1  # reweight reads its settings twice, and says it once
    manifest = _manifest(tmp_path / "r")
    assert "guide" not in manifest["settings"] and "guide" not in manifest
    (tmp_path / "bad.yaml").write_text("guide: {excite: circle, step_size: .nan}\n")  # still checked when read
    result = cli("reweight", "a red circle", "--model", sd1_path, "--config", "bad.yaml", "--word", "red",
                 "--weights", "2", "--out", "r2", *FAST)
    assert result.exit_code == 2 and "key 'guide.step_size'" in result.output

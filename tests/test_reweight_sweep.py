"""Sweep helpers: seed and weight lists, batching of consecutive seeds, the sheet's layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xattn.grid import EMPTY_CELL
from xattn.reweight import ReweightError
from xattn.app.reweight_sweep import Cell, _runs_of_consecutive, parse_seeds, parse_weights, sweep_sheet


@pytest.mark.parametrize(("text", "seeds"), [("0:4", [0, 1, 2, 3]), ("3,7", [3, 7]), ("5", [5]), (" 2:3 ", [2])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["4:2", "a:3", "-1", "1,,2", "0:4:2", ""])
def test_parse_seeds_refuses(text):
    with pytest.raises(ReweightError, match="seeds"):
        parse_seeds(text)


def test_parse_weights():
    assert parse_weights("-1,0,0.5, 1,2,4") == [-1.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    with pytest.raises(ReweightError, match="number, not 'two'"):
        parse_weights("1,two")
    with pytest.raises(ReweightError, match="finite number, not 'inf'"):
        parse_weights("1,inf")
    with pytest.raises(ReweightError, match="float32"):
        parse_weights("1,1e39")  # finite in Python, infinite in float32


def test_consecutive_seeds_are_batched():
    assert _runs_of_consecutive([0, 1, 2, 7, 8, 4]) == [(0, 3), (7, 2), (4, 1)]


def test_sheet_rows_are_weights_and_columns_mode_by_seed():
    colours = {("scale", 0.0, 0): (255, 0, 0), ("scale", 0.0, 1): (0, 255, 0),
               ("bias", 0.0, 0): None, ("bias", 0.0, 1): None,
               ("scale", 1.0, 0): (0, 0, 255), ("scale", 1.0, 1): (255, 255, 0),
               ("bias", 1.0, 0): (0, 255, 255), ("bias", 1.0, 1): (255, 0, 255)}
    cells = [Cell(mode, weight, seed, None if colour is None else Image.new("RGB", (32, 32), colour),
                  skipped=None if colour else "bias needs w > 0")
             for (mode, weight, seed), colour in colours.items()]
    sheet = np.asarray(sweep_sheet(cells, min_cell=64))

    def top_left(colour):
        ys, xs = np.nonzero(np.all(sheet == np.array(colour, dtype=np.uint8), axis=-1))
        return ys.min(), xs.min(), ys.max() - ys.min() + 1

    # row of w=0 above row of w=1; columns scale s0, scale s1, bias s0, bias s1 from left to right
    red, green, blue = top_left((255, 0, 0)), top_left((0, 255, 0)), top_left((0, 0, 255))
    cyan, magenta = top_left((0, 255, 255)), top_left((255, 0, 255))
    assert red[2] == 64  # 32 px upscaled to the 64 px minimum
    assert red[0] == green[0] < blue[0] == cyan[0] == magenta[0]
    assert red[1] == blue[1] < green[1] < cyan[1] < magenta[1]
    grey = np.all(sheet == np.array(EMPTY_CELL, dtype=np.uint8), axis=-1)
    for column in (cyan[1], magenta[1]):  # the two skipped bias cells, in the w=0 row
        assert grey[red[0]:red[0] + 64, column:column + 64].all()


# -- guidance (`guide:`) in a reweight sweep ----------------------------------------------------------

GUIDE = 'guide: {excite: [red, circle], box: {red circle: [0, 0, 0.5, 1]}, steps: "0:1", step_size: 5}'
GUIDE_OPTIONS = ["--excite", "red,circle", "--box", "red circle=0,0,0.5,1", "--guide-steps", "0:1",
                 "--guide-step-size", "5"]


def test_a_guided_reweight_sweep_guides_every_cell_and_records_it(cli, sd1_path, tmp_path):
    """Independent reference: at weight 1 (scale mode changes nothing) a guided cell is `xattn generate` with the
    same guidance options; at weight 8 it is neither the unguided cell nor the weight-1 one."""
    import json

    from test_sweep import pixels, read_results, write_config

    from xattn.app import pngmeta

    grid = {"prompts": ["a red circle"], "seeds": [3], "words": ["red"], "weights": [1.0, 8.0], "modes": ["scale"]}
    guided = write_config(tmp_path / "g.yaml", sd1_path, grid=grid, extra=GUIDE)
    result = cli("sweep", guided, "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output
    unit, strong = read_results(tmp_path / "run")
    result = cli("generate", "a red circle", "--model", sd1_path, "--steps", 2, "--size", 32, "--seed", 3,
                 *GUIDE_OPTIONS, "--out", "gen", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "run" / unit["image"]), pixels(tmp_path / "gen" / "image-0.png"))
    assert cli("sweep", write_config(tmp_path / "u.yaml", sd1_path, grid=grid), "--out", "plain",
               "--no-progress").exit_code == 0
    _, unguided = read_results(tmp_path / "plain")
    strong_pixels = pixels(tmp_path / "run" / strong["image"])
    assert not np.array_equal(strong_pixels, pixels(tmp_path / "plain" / unguided["image"]))  # guided
    assert not np.array_equal(strong_pixels, pixels(tmp_path / "run" / unit["image"]))  # and reweighted
    # recorded in the plan, the manifest, each record and each PNG; the PNG alone repeats the cell
    generated = json.loads((tmp_path / "gen" / "manifest.json").read_text())["guide"]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert plan["settings"]["guide"] == manifest["settings"]["guide"] == generated
    for record in (unit, strong):
        assert record["guide"] == generated and record["reweight"]["weights"] == {"red": record["weight"]}
        png = pngmeta.read_parameters(tmp_path / "run" / record["image"])["xattn"]
        assert png["guide"] == generated and png["reweight"] == record["reweight"]
    result = cli("generate", "--from-png", tmp_path / "run" / strong["image"], "--out", "again", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(strong_pixels, pixels(tmp_path / "again" / "image-0.png"))


def test_a_reweight_sweep_resumes_only_with_the_same_guidance(cli, sd1_path, tmp_path):
    from test_sweep import write_config

    grid = {"prompts": ["a red circle"], "seeds": [0], "words": ["red"], "weights": [2.0]}
    config = write_config(tmp_path / "s.yaml", sd1_path, grid=grid, extra=GUIDE)
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0
    before = (tmp_path / "run" / "results.jsonl").read_text()
    result = cli("sweep", config, "--out", "run", "--no-progress")
    assert result.exit_code == 0 and "1 were already done" in result.output, result.output
    for name, extra in [("other", GUIDE.replace("step_size: 5", "step_size: 6")), ("none", "")]:
        changed = write_config(tmp_path / f"{name}.yaml", sd1_path, grid=grid, extra=extra)
        result = cli("sweep", changed, "--out", "run", "--no-progress")
        assert result.exit_code == 2 and "other settings (guide " in result.output, result.output
    assert (tmp_path / "run" / "results.jsonl").read_text() == before


def test_a_reweight_sweep_checks_its_guidance_before_any_job(cli, sd1_path, tmp_path):
    from test_sweep import write_config

    grid = {"prompts": ["a red circle"], "seeds": [0], "words": ["red"], "weights": [2.0]}
    for index, (extra, message) in enumerate([('guide: {excite: circle, steps: "3:4"}', "holds no step"),
                                              ("guide: {excite: hat}", "hat")]):
        config = write_config(tmp_path / f"c{index}.yaml", sd1_path, grid=grid, extra=extra)
        result = cli("sweep", config, "--out", f"bad{index}", "--no-progress")
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
        jobs = tmp_path / f"bad{index}" / "jobs"
        assert not jobs.exists() or not any(jobs.iterdir())

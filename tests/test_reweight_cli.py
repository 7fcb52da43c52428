"""``xattn reweight``: grids, cells, manifest, and errors a user can fix, on a tiny random SD 1.x."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xattn import runner
from xattn.cli import app
from xattn.pngmeta import read_parameters

COMMON = ["--size", "32", "--steps", "2", "--guidance", "5", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(app, ["reweight", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sweep_run(sd1_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    result = invoke("a red circle and a blue square", "--word", "red", "--weights", "0,1",
                    "--modes", "scale,bias", "--seeds", "0:2", "--model", str(sd1_path), "--out", str(out), *COMMON)
    assert result.exit_code == 0, result.output
    return out


def test_sweep_writes_grid_cells_and_manifest(sweep_run):
    manifest = json.loads((sweep_run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["grid"] == "grid.png"
    cells = manifest["reweight"]["cells"]
    assert len(cells) == 2 * 2 * 2  # modes x weights x seeds
    skipped = [c for c in cells if c["skipped"]]
    assert {(c["mode"], c["weight"]) for c in skipped} == {("bias", 0.0)}
    assert all("'red'" in c["skipped"] and "bias" in c["skipped"] for c in skipped)
    for cell in cells:
        if not cell["skipped"]:
            path = sweep_run / cell["file"]
            assert path.is_file() and cell["file"] in manifest["outputs"]
            params = read_parameters(path)
            assert params["seed"] == cell["seed"] and params["xattn"]["reweight"]["mode"] == cell["mode"]
    grid = Image.open(sweep_run / "grid.png")
    assert grid.width > 4 * 128 and grid.height > 2 * 128  # 4 columns, 2 rows of upscaled 32px cells


def test_weight_one_is_the_plain_image_and_weight_zero_is_not(sweep_run, sd1_path):
    pipe = runner.load_pipeline(str(sd1_path), device="cpu", dtype="float32")
    # seeds 0:2 ran as one batch of two; a batch of one may differ by a rounding step, so batch the same way
    plain = runner.generate(pipe, "a red circle and a blue square", seed=0, num_images_per_prompt=2,
                            steps=2, guidance=5.0, size=32)[1]
    one = np.asarray(Image.open(sweep_run / "scale_w1_seed1.png"), dtype=np.int16)
    zero = np.asarray(Image.open(sweep_run / "scale_w0_seed1.png"), dtype=np.int16)
    assert np.array_equal(one, np.asarray(plain, dtype=np.int16))
    assert np.abs(zero - one).max() > 0


def test_prompt_weights_alone_make_one_row(sd1_path, tmp_path):
    out = tmp_path / "run"
    result = invoke("a (red:2) circle", "--model", str(sd1_path), "--out", str(out), "--seed", "3", *COMMON)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["file"] for c in manifest["reweight"]["cells"]] == ["scale_prompt_seed3.png"]
    params = read_parameters(out / "scale_prompt_seed3.png")
    assert params["prompt"] == "a red circle" and params["xattn"]["reweight"]["weights"] == {"red": 2.0}


@pytest.mark.parametrize(("args", "message"), [
    (["--word", "purple", "--weights", "0,1"], "'purple' is not in the prompt"),
    (["--word", "red", "--weights", "1,nan"], "finite number, not 'nan'"),
    (["--word", "red"], "--word and --weights together"),
    (["--modes", "scale,multiply"], "unknown reweight mode 'multiply'"),
    (["--mode", "scale", "--modes", "bias"], "--mode or --modes"),
    (["--seeds", "4:2"], "STOP > START"),
    (["--window", "0:2.5"], "outside 0..1"),
])
def test_user_errors_are_one_line_and_exit_2(sd1_path, tmp_path, args, message):
    result = invoke("a red circle", "--model", str(sd1_path), "--out", str(tmp_path / "run"), *args, *COMMON)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "run").glob("*.png")) if (tmp_path / "run").exists() else True


def test_existing_output_folder_is_not_overwritten(sd1_path, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("a red circle", "--model", str(sd1_path), "--out", str(out), *COMMON)
    assert result.exit_code == 2 and "not empty" in result.output
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_a_config_file_sets_the_sweep(sd1_path, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text('word: circle\nweights: "0.5,2"\nmodes: bias\nseeds: "4,6"\n')
    out = tmp_path / "run"
    result = invoke("a red circle", "--model", str(sd1_path), "--out", str(out), "--config", str(config), *COMMON)
    assert result.exit_code == 0, result.output
    cells = json.loads((out / "manifest.json").read_text())["reweight"]["cells"]
    assert [(c["mode"], c["weight"], c["seed"]) for c in cells] == [
        ("bias", 0.5, 4), ("bias", 0.5, 6), ("bias", 2.0, 4), ("bias", 2.0, 6)]


def test_a_mode_that_fails_while_running_leaves_grey_cells(sd1_path, tmp_path):
    """The tiny encoder's rows average to 0, so embedding mode cannot restore the mean (w != 1)."""
    out = tmp_path / "run"
    result = invoke("a red circle", "--word", "red", "--weights", "0,1", "--modes", "scale,embedding",
                    "--model", str(sd1_path), "--out", str(out), *COMMON)
    assert result.exit_code == 0, result.output
    cells = json.loads((out / "manifest.json").read_text())["reweight"]["cells"]
    skipped = [(c["mode"], c["weight"]) for c in cells if c["skipped"]]
    assert skipped == [("embedding", 0.0)]
    assert "average to about 0" in next(c["skipped"] for c in cells if c["skipped"])
    assert (out / "embedding_w1_seed0.png").is_file() and (out / "grid.png").is_file()

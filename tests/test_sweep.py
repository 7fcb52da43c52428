"""Sweeps in one process: the grid, resuming after a crash, errors, results and contact sheet."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from xattn.app import pngmeta, runner, sweep
from xattn.app.config import ConfigError

GRID = {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "words": ["a"], "weights": [0.5, 2.0]}


def write_config(path, model, *, job="reweight", grid=None, extra=""):
    grid = grid or GRID
    lines = [f"job: {job}", f"model: {model}", "steps: 2", "size: 32", extra, "grid:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in grid.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_results(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# -- planning ---------------------------------------------------------------------------------

def test_plan_is_the_full_product_in_a_fixed_order():
    grid = {**GRID, "modes": ["scale", "bias"], "step_windows": [None, "0:0.5"]}
    jobs = sweep.plan_jobs(sweep.check_grid(grid, "reweight"), "reweight")
    expected = list(itertools.product(grid["prompts"], grid["seeds"], grid["words"], grid["weights"],
                                      grid["modes"], grid["step_windows"]))
    assert [(j.prompt, j.seed, j.word, j.weight, j.mode, j.window) for j in jobs] == expected
    assert [j.index for j in jobs] == list(range(len(expected)))
    again = sweep.plan_jobs(sweep.check_grid(grid, "reweight"), "reweight")
    assert [j.name for j in again] == [j.name for j in jobs]
    assert len({j.name for j in jobs}) == len(jobs)


def test_seed_ranges_and_generate_grids():
    jobs = sweep.plan_jobs(sweep.check_grid({"prompts": ["x"], "seeds": "2:5"}, "generate"), "generate")
    assert [j.seed for j in jobs] == [2, 3, 4] and all(j.word is None for j in jobs)


@pytest.mark.parametrize("grid, kind, message", [
    ({**GRID, "wieghts": [1]}, "reweight", "unknown key 'grid.wieghts'"),
    ({"prompts": ["x"], "seeds": [0], "words": ["x"]}, "reweight", "'grid.weights' is missing"),
    ({**GRID, "weights": ["big"]}, "reweight", "'grid.weights' must be a non-empty list of numbers"),
    ({**GRID, "seeds": "5:2"}, "reweight", "'grid.seeds' must be a range"),
    ({**GRID, "modes": ["loud"]}, "reweight", "'grid.modes'.*'loud'"),
    ({"prompts": ["x"], "seeds": [0], "words": ["x"]}, "generate", "'grid.words' has no meaning for job: generate"),
    ({"prompts": [], "seeds": [0]}, "generate", "'grid.prompts'"),
])
def test_grid_errors_name_the_key(grid, kind, message):
    with pytest.raises(ConfigError, match=message):
        sweep.check_grid(grid, kind)


# -- running ----------------------------------------------------------------------------------

def test_sweep_writes_results_images_and_contact_sheet(cli, sd1_path, tmp_path):
    config = write_config(tmp_path / "s.yaml", sd1_path)
    result = cli("sweep", config, "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "run"
    records = read_results(folder)
    planned = [entry["job"] for entry in json.loads((folder / "plan.json").read_text())["jobs"]]
    assert [r["job"] for r in records] == planned and len(planned) == 8
    for record in records:
        params = pngmeta.read_parameters(folder / record["image"])
        assert (params["prompt"], params["seed"]) == (record["prompt"], record["seed"])
        assert params["xattn"]["job"] == record["job"] and params["xattn"]["weight"] == record["weight"]
    with Image.open(folder / "contact-sheet.png") as sheet:
        assert sheet.width > 2 * 32 and sheet.height > 4 * 32  # 4 rows (prompt x seed), 2 columns (weights)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["finished_jobs"] == 8


def test_reweight_sweep_cells_equal_a_hand_made_reweight(cli, sd1_path, tmp_path):
    """Independent reference: a reweight cell is runner.generate under xattn.hooks with Reweight({word: w})."""
    import xattn
    from xattn.reweight import Reweight

    grid = {"prompts": ["a red circle"], "seeds": [3], "words": ["red"], "weights": [0.0, 3.0], "modes": ["scale"]}
    config = write_config(tmp_path / "s.yaml", sd1_path, grid=grid)
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0
    pipe = runner.load_pipeline(sd1_path, device="cpu")
    for record in read_results(tmp_path / "run"):
        with xattn.hooks(pipe, Reweight({"red": record["weight"]}, mode="scale")):
            expected = runner.generate(pipe, "a red circle", seed=3, steps=2, guidance=5.0, size=32)[0]
        assert np.array_equal(pixels(tmp_path / "run" / record["image"]), np.asarray(expected))


def test_sweep_images_equal_plain_generation(cli, sd1_path, tmp_path):
    """Independent reference: a generate-kind sweep cell is runner.generate with the job's seed."""
    config = write_config(tmp_path / "s.yaml", sd1_path, job="generate", grid={"prompts": ["a red circle"], "seeds": [3, 4]})
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0
    pipe = runner.load_pipeline(sd1_path, device="cpu")
    for record in read_results(tmp_path / "run"):
        expected = runner.generate(pipe, "a red circle", seed=record["seed"], steps=2, guidance=5.0, size=32)[0]
        assert np.array_equal(pixels(tmp_path / "run" / record["image"]), np.asarray(expected))


def test_weight_one_is_the_plain_image_and_other_weights_are_not(cli, sd1_path, tmp_path):
    grid = {"prompts": ["a red circle"], "seeds": [0], "words": ["red"], "weights": [1.0, 8.0]}
    config = write_config(tmp_path / "s.yaml", sd1_path, grid=grid)
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0, "sweep failed"
    unit, strong = read_results(tmp_path / "run")
    pipe = runner.load_pipeline(sd1_path, device="cpu")
    plain = np.asarray(runner.generate(pipe, "a red circle", seed=0, steps=2, guidance=5.0, size=32)[0])
    assert np.array_equal(pixels(tmp_path / "run" / unit["image"]), plain)
    assert not np.array_equal(pixels(tmp_path / "run" / strong["image"]), plain)


def test_killed_sweep_resumes_without_redoing_or_losing_jobs(cli, sd1_path, tmp_path, monkeypatch):
    config = write_config(tmp_path / "s.yaml", sd1_path)
    real = sweep.JOB_KINDS["reweight"]
    calls = []

    def crashes_on_the_fourth(pipe, job, settings):
        calls.append(job.name)
        if len(calls) == 4:
            raise RuntimeError("simulated kill")
        return real(pipe, job, settings)

    monkeypatch.setitem(sweep.JOB_KINDS, "reweight", crashes_on_the_fourth)
    result = cli("sweep", config, "--out", "run", "--no-progress")
    assert result.exit_code != 0 and "simulated kill" in str(result.exception)
    folder = tmp_path / "run"
    done_first = [r["job"] for r in read_results(folder)]
    assert done_first == calls[:3]
    assert json.loads((folder / "manifest.json").read_text())["status"] == "failed"
    first_bytes = {name: (folder / "images" / f"{name}.png").read_bytes() for name in done_first}
    mtimes = {name: (folder / "jobs" / f"{name}.json").stat().st_mtime_ns for name in done_first}

    calls.clear()
    monkeypatch.setitem(sweep.JOB_KINDS, "reweight", lambda *a: (calls.append(a[1].name), real(*a))[1])
    result = cli("sweep", config, "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "5 jobs here, 3 were already done" in result.output
    assert not set(calls) & set(done_first) and len(calls) == 5  # nothing redone
    records = read_results(folder)
    planned = [entry["job"] for entry in json.loads((folder / "plan.json").read_text())["jobs"]]
    assert [r["job"] for r in records] == planned  # nothing missing, each once
    assert all((folder / "images" / f"{name}.png").read_bytes() == data for name, data in first_bytes.items())
    assert all((folder / "jobs" / f"{n}.json").stat().st_mtime_ns == t for n, t in mtimes.items())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["already_done"] == 3
    assert [run["status"] for run in manifest["earlier_runs"]] == ["failed"]
    assert manifest["earlier_runs"][0]["finished_jobs"] == 3


# -- errors -------------------------------------------------------------------------------------

def test_unknown_word_fails_before_any_job(cli, sd1_path, tmp_path):
    grid = {**GRID, "words": ["purple"]}
    config = write_config(tmp_path / "s.yaml", sd1_path, grid=grid)
    result = cli("sweep", config, "--no-progress")
    assert result.exit_code == 2 and "purple" in result.output
    assert not (tmp_path / "outputs").exists()


def test_bad_selector_is_named(cli, sd1_path, tmp_path):
    config = write_config(tmp_path / "s.yaml", sd1_path, extra='sites: "res=huge"')
    result = cli("sweep", config, "--no-progress")
    assert result.exit_code == 2 and "key 'sites'" in result.output


def test_bad_config_key_is_named(cli, sd1_path, tmp_path):
    config = write_config(tmp_path / "s.yaml", sd1_path, extra="gudiance: 3")
    result = cli("sweep", config, "--no-progress")
    assert result.exit_code == 2 and "unknown key 'gudiance'" in result.output


def test_missing_model_is_named(cli, tmp_path):
    config = write_config(tmp_path / "s.yaml", tmp_path / "no-model")
    result = cli("sweep", config)
    assert result.exit_code == 2 and "no-model" in result.output


def test_folder_of_another_sweep_or_other_files_is_refused(cli, sd1_path, tmp_path):
    small = {"prompts": ["a red circle"], "seeds": [0]}
    assert cli("sweep", write_config(tmp_path / "a.yaml", sd1_path, job="generate", grid=small),
               "--out", "run", "--no-progress").exit_code == 0
    other = write_config(tmp_path / "b.yaml", sd1_path, job="generate", grid={**small, "seeds": [0, 1]})
    result = cli("sweep", other, "--out", "run", "--no-progress")
    assert result.exit_code == 2 and "different sweep" in result.output
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    result = cli("sweep", other, "--out", "notes", "--no-progress")
    assert result.exit_code == 2 and "holds no sweep" in result.output
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["x.txt"]


def test_example_config_is_a_valid_grid_of_at_least_eight_jobs():
    from pathlib import Path

    from xattn.app.config import load_config, one_of

    path = Path(__file__).resolve().parents[1] / "configs" / "sweep-example.yaml"
    data = load_config(path, extra_keys={"job": one_of(sweep.JOB_KINDS), "grid": None})
    jobs = sweep.plan_jobs(sweep.check_grid(data["grid"], data["job"]), data["job"])
    assert len(jobs) >= 8 and "model" not in data  # runs on the embedded model


def test_modes_and_step_windows_reach_the_controller(cli, sd1_path, tmp_path):
    grid = {"prompts": ["a red circle"], "seeds": [0], "words": ["red"], "weights": [8.0],
            "modes": ["scale", "bias"], "step_windows": [None, "0:0.5"]}
    config = write_config(tmp_path / "s.yaml", sd1_path, grid=grid)
    result = cli("sweep", config, "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output
    records = read_results(tmp_path / "run")
    assert [(r["mode"], r["window"]) for r in records] == [("scale", None), ("scale", "0:0.5"),
                                                           ("bias", None), ("bias", "0:0.5")]
    for record in records:
        assert record["reweight"]["mode"] == record["mode"]
        assert record["reweight"]["weights"] == {"red": 8.0}
    images = [pixels(tmp_path / "run" / r["image"]) for r in records]
    # weighting only the first of two steps is not the same as weighting both
    assert not np.array_equal(images[0], images[1])


def test_reweighted_sweep_image_is_reproduced_from_its_png(cli, sd1_path, tmp_path):
    grid = {"prompts": ["a red circle"], "seeds": [2], "words": ["red"], "weights": [6.0],
            "modes": ["bias"], "step_windows": ["0:0.5"]}
    config = write_config(tmp_path / "s.yaml", sd1_path, grid=grid)
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0
    (record,) = read_results(tmp_path / "run")
    original = tmp_path / "run" / record["image"]
    result = cli("generate", "--from-png", original, "--out", "again", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(original), pixels(tmp_path / "again" / "image-0.png"))
    pipe = runner.load_pipeline(sd1_path, device="cpu")
    plain = np.asarray(runner.generate(pipe, "a red circle", seed=2, steps=2, guidance=5.0, size=32)[0])
    assert not np.array_equal(pixels(original), plain)  # the reweighting was repeated, not dropped


def test_without_out_each_run_gets_a_new_folder(cli, sd1_path, tmp_path):
    config = write_config(tmp_path / "tiny-grid.yaml", sd1_path, job="generate",
                          grid={"prompts": ["a red circle"], "seeds": [0]})
    for _ in range(2):
        result = cli("sweep", config, "--no-progress")
        assert result.exit_code == 0, result.output
    folders = sorted((tmp_path / "outputs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("sweep-") and "tiny-grid" in f.name for f in folders)
    assert all(len(read_results(f)) == 1 for f in folders)


def test_resuming_with_other_settings_is_refused(cli, sd1_path, tmp_path):
    config = write_config(tmp_path / "s.yaml", sd1_path, job="generate", grid={"prompts": ["a red circle"], "seeds": [0]})
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0
    before = (tmp_path / "run" / "results.jsonl").read_text()
    result = cli("sweep", config, "--out", "run", "--steps", 3, "--no-progress")
    assert result.exit_code == 2 and "steps 2 -> 3" in result.output
    assert (tmp_path / "run" / "results.jsonl").read_text() == before
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0  # same settings: resumes
    other = write_config(tmp_path / "c.yaml", sd1_path, job="generate", grid={"prompts": ["a red circle"], "seeds": [0]},
                         extra="syntax: compel")
    result = cli("sweep", other, "--out", "run", "--no-progress")
    assert result.exit_code == 2 and "syntax 'a1111' -> 'compel'" in result.output  # prompts would read differently


def test_sweep_reads_prompts_in_its_syntax(cli, sd1_path, tmp_path):
    """compel's ``red++`` is red weighted 1.1² (A1111 reads it as text): the cells differ, the manifest says which."""
    import xattn
    from xattn.reweight import Reweight

    grid = {"prompts": ["a red++ circle"], "seeds": [3], "words": ["circle"], "weights": [1.0]}
    images = {}
    for syntax in ("a1111", "compel"):
        config = write_config(tmp_path / f"{syntax}.yaml", sd1_path, grid=grid, extra=f"syntax: {syntax}")
        result = cli("sweep", config, "--out", syntax, "--no-progress")
        assert result.exit_code == 0, result.output
        (record,) = read_results(tmp_path / syntax)
        images[syntax] = pixels(tmp_path / syntax / record["image"])
        assert json.loads((tmp_path / syntax / "manifest.json").read_text())["settings"]["syntax"] == syntax
    pipe = runner.load_pipeline(sd1_path, device="cpu")
    with xattn.hooks(pipe, Reweight({"red": 1.1 ** 2, "circle": 1.0}, mode="scale")):
        expected = runner.generate(pipe, "a red circle", seed=3, steps=2, guidance=5.0, size=32)[0]
    assert np.array_equal(images["compel"], np.asarray(expected))
    assert not np.array_equal(images["a1111"], images["compel"])
    generate = write_config(tmp_path / "g.yaml", sd1_path, job="generate", extra="syntax: compel",
                            grid={"prompts": ["a red++ circle"], "seeds": [3]})
    assert cli("sweep", generate, "--out", "g", "--no-progress").exit_code == 0
    (record,) = read_results(tmp_path / "g")
    from xattn.prompts.pipeline import prompt_kwargs  # what `xattn generate --syntax compel` hands the pipeline

    embeds = prompt_kwargs(pipe, ["a red++ circle"], syntax="compel")
    assert "prompt_embeds" in embeds
    compel = runner.generate(pipe, "a red++ circle", seed=3, steps=2, guidance=5.0, size=32, **embeds)[0]
    plain = runner.generate(pipe, "a red++ circle", seed=3, steps=2, guidance=5.0, size=32)[0]
    assert np.array_equal(pixels(tmp_path / "g" / record["image"]), np.asarray(compel))
    assert not np.array_equal(np.asarray(compel), np.asarray(plain))


def test_sweep_syntax_is_checked_with_the_config(cli, sd1_path, tmp_path):
    config = write_config(tmp_path / "s.yaml", sd1_path, extra="syntax: klingon")
    result = cli("sweep", config, "--no-progress")
    assert result.exit_code == 2 and "'syntax' must be one of a1111, compel" in result.output


# -- guidance (`guide:`) in a generate sweep ---------------------------------------------------------

GUIDE = 'guide: {excite: [red, circle], box: {red circle: [0, 0, 0.5, 1]}, steps: "0:1", step_size: 5}'
GUIDE_OPTIONS = ["--excite", "red,circle", "--box", "red circle=0,0,0.5,1", "--guide-steps", "0:1",
                 "--guide-step-size", "5"]


def test_a_guided_sweep_cell_equals_generate_with_the_same_guidance(cli, sd1_path, tmp_path):
    config = write_config(tmp_path / "s.yaml", sd1_path, job="generate", extra=GUIDE,
                          grid={"prompts": ["a red circle"], "seeds": [3]})
    result = cli("sweep", config, "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output
    (record,) = read_results(tmp_path / "run")
    swept = tmp_path / "run" / record["image"]
    result = cli("generate", "a red circle", "--model", sd1_path, "--steps", 2, "--size", 32, "--seed", 3,
                 *GUIDE_OPTIONS, "--out", "gen", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(swept), pixels(tmp_path / "gen" / "image-0.png"))
    pipe = runner.load_pipeline(sd1_path, device="cpu")
    plain = np.asarray(runner.generate(pipe, "a red circle", seed=3, steps=2, guidance=5.0, size=32)[0])
    assert not np.array_equal(pixels(swept), plain)  # the guidance was applied
    generated = json.loads((tmp_path / "gen" / "manifest.json").read_text())["guide"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert manifest["settings"]["guide"] == plan["settings"]["guide"] == record["guide"] == generated
    assert pngmeta.read_parameters(swept)["xattn"]["guide"] == generated
    # the PNG alone makes the image again
    result = cli("generate", "--from-png", swept, "--out", "again", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(swept), pixels(tmp_path / "again" / "image-0.png"))


def test_resuming_with_other_guidance_is_refused(cli, sd1_path, tmp_path):
    grid = {"prompts": ["a red circle"], "seeds": [0]}
    config = write_config(tmp_path / "s.yaml", sd1_path, job="generate", grid=grid, extra=GUIDE)
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0
    before = (tmp_path / "run" / "results.jsonl").read_text()
    assert cli("sweep", config, "--out", "run", "--no-progress").exit_code == 0  # the same guidance resumes
    for name, extra in [("other", GUIDE.replace("step_size: 5", "step_size: 6")), ("none", "")]:
        changed = write_config(tmp_path / f"{name}.yaml", sd1_path, job="generate", grid=grid, extra=extra)
        result = cli("sweep", changed, "--out", "run", "--no-progress")
        assert result.exit_code == 2 and "other settings (guide " in result.output, result.output
    assert (tmp_path / "run" / "results.jsonl").read_text() == before
    unguided = write_config(tmp_path / "u.yaml", sd1_path, job="generate", grid=grid)
    assert cli("sweep", unguided, "--out", "plain", "--no-progress").exit_code == 0
    result = cli("sweep", config, "--out", "plain", "--no-progress")  # guidance added to an unguided sweep
    assert result.exit_code == 2 and "guide None -> " in result.output


def test_guidance_in_a_sweep_is_checked_before_any_job(cli, sd1_path, tmp_path):
    grid = {"prompts": ["a red circle"], "seeds": [0]}
    cases = [
        (write_config(tmp_path / "n.yaml", sd1_path, job="generate", grid=grid,
                      extra="guide: {excite: circle, step_size: .nan}"), "key 'guide.step_size'"),
        (write_config(tmp_path / "w.yaml", sd1_path, job="generate", grid=grid,
                      extra='guide: {excite: circle, steps: "3:4"}'), "holds no step of this 2-step sweep"),
        (write_config(tmp_path / "h.yaml", sd1_path, job="generate", grid=grid,
                      extra="guide: {excite: hat}"), "hat"),
    ]
    for index, (config, message) in enumerate(cases):
        result = cli("sweep", config, "--out", f"bad{index}", "--no-progress")
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / f"bad{index}" / "jobs").exists() or not any((tmp_path / f"bad{index}" / "jobs").iterdir())

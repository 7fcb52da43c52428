"""A damaged sweep resumes to a complete, valid result: bad records and images are made again, by name."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from xattn.cli import app

GRID = {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1]}


@pytest.fixture
def swept(monkeypatch, tmp_path, sd1_path):
    """A finished 4-job generate sweep, and a function that reruns it."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "s.yaml"
    config.write_text(f"job: generate\nmodel: {sd1_path}\nsteps: 2\nsize: 32\ngrid:\n"
                      + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in GRID.items()))
    folder = tmp_path / "sweep"

    def run():
        return CliRunner().invoke(app, ["sweep", str(config), "--out", str(folder), "--no-progress"])

    first = run()
    assert first.exit_code == 0, first.output
    return folder, run


def state(folder):
    """Each job's record (without its timing and rank) and image bytes."""
    records = {}
    for path in sorted((folder / "jobs").glob("*.json")):
        record = json.loads(path.read_text())
        records[path.stem] = ({k: v for k, v in record.items() if k not in ("seconds", "rank")},
                              (folder / record["image"]).read_bytes())
    return records


def test_cut_record_missing_image_and_garbage_image_are_made_again(swept):
    folder, run = swept
    before = state(folder)
    names = sorted(before)
    assert len(names) == 4
    cut, gone, garbage = names[0], names[1], names[2]
    record = folder / "jobs" / f"{cut}.json"
    record.write_text(record.read_text()[:20])
    (folder / "images" / f"{gone}.png").unlink()
    (folder / "images" / f"{garbage}.png").write_bytes(b"not a png")
    (folder / "contact-sheet.png").unlink()

    again = run()
    assert again.exit_code == 0, again.output
    assert f"jobs/{cut}.json does not parse" in again.output
    assert f"images/{gone}.png is missing or unreadable" in again.output
    assert f"images/{garbage}.png is missing or unreadable" in again.output
    assert "ran 3 jobs here, 1 were already done" in again.output
    assert state(folder) == before  # the same records and the same pixels as the undamaged run
    results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [r["job"] for r in results] == names
    with Image.open(folder / "contact-sheet.png") as sheet:
        sheet.load()
    assert json.loads((folder / "manifest.json").read_text())["status"] == "finished"


def test_a_damaged_manifest_does_not_stop_a_resume(swept):
    folder, run = swept
    (folder / "manifest.json").write_text("{cut")
    again = run()
    assert again.exit_code == 0, again.output
    assert json.loads((folder / "manifest.json").read_text())["finished_jobs"] == 4


def test_a_damaged_plan_is_named(swept):
    folder, run = swept
    (folder / "plan.json").write_text("[")
    again = run()
    assert again.exit_code == 2 and "plan.json cannot be read as JSON" in again.output

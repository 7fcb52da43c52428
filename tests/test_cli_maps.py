"""`xattn maps` writes every file, reads back, refuses to overwrite; `xattn report` rebuilds the report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from xattn.capture.export import load_maps
from xattn.cli import app

FAST = ["--steps", "3", "--size", "32", "--seed", "5"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def maps_run(sd1_path, tmp_path):
    out = tmp_path / "run"
    result = invoke("maps", "a red cat", "--model", sd1_path, "--out", out, "--per-step", "--images", "2", *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_maps_writes_all_its_files(maps_run):
    names = {p.name for p in maps_run.iterdir()}
    assert {"image-0.png", "image-1.png", "words.png", "resolutions.png", "steps.png", "report.html",
            "maps.safetensors", "manifest.json"} <= names
    manifest = json.loads((maps_run / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["maps"]["prompts"] == ["a red cat"] and manifest["maps"]["seed"] == [5, 6]
    assert manifest["maps"]["steps"] == [0, 1, 2] and manifest["maps"]["per_step"] is True
    maps = load_maps(maps_run)
    assert maps.images_per_prompt == 2 and maps.per_step and maps.words() == ["a", "red", "cat"]
    assert maps.word("cat", image=1).shape == (32, 32)


def test_maps_refuses_an_existing_run_folder(maps_run, sd1_path):
    before = {p.name: p.stat().st_mtime_ns for p in maps_run.iterdir()}
    result = CliRunner().invoke(app, ["maps", "a red cat", "--model", str(sd1_path), "--out", str(maps_run), *FAST])
    assert result.exit_code == 2
    assert "exists" in result.output and "new folder" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in maps_run.iterdir()} == before


def test_maps_selection_options_reach_the_capture(sd1_path, tmp_path):
    out = tmp_path / "run"
    result = invoke("maps", "a red cat", "--model", sd1_path, "--out", out, "--res", "8", "--site", "up_blocks.*",
                    "--window", "1:3", "--per-step", "--token", "cat", *FAST)
    assert result.exit_code == 0, result.output
    maps = load_maps(out)
    assert maps.resolutions == [(8, 8)] and maps.steps == [1, 2]
    up_at_8 = {f"up_blocks.1.attentions.{k}.transformer_blocks.0.attn2" for k in (0, 1)}  # 2 layers + 1 per up block
    assert {site for layer in maps.layers for site in layer.sites} == up_at_8
    assert json.loads((out / "manifest.json").read_text())["maps"]["shown_words"] == ["cat"]


@pytest.mark.parametrize("args, message", [
    (["--res", "big"], "res"),
    (["--budget", "lots"], "not a size"),
    (["--token", "dog"], "'dog' is not in the prompt"),
    (["--per-step", "--budget", "10KB"], "over the budget"),
])
def test_maps_reports_bad_options_in_one_line(sd1_path, tmp_path, args, message):
    result = CliRunner().invoke(app, ["maps", "a red cat", "--model", str(sd1_path), "--out", str(tmp_path / "r"),
                                      *FAST, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_report_command_rebuilds_the_report(maps_run):
    result = invoke("report", maps_run, "--cmap", "viridis")
    assert result.exit_code == 0, result.output
    assert (maps_run / "report-viridis.html").is_file()
    again = CliRunner().invoke(app, ["report", str(maps_run), "--cmap", "viridis"])
    assert again.exit_code == 2 and "exists" in again.output
    missing = CliRunner().invoke(app, ["report", str(maps_run / "nowhere")])
    assert missing.exit_code == 2 and "missing" in missing.output


def test_maps_reads_the_prompt_in_its_syntax(sd1_path, tmp_path):
    runs = {}
    for syntax in ("a1111", "compel"):
        out = tmp_path / syntax
        result = invoke("maps", "a red++ circle", "--model", sd1_path, "--out", out, "--syntax", syntax, *FAST)
        assert result.exit_code == 0, result.output
        runs[syntax] = (load_maps(out), json.loads((out / "manifest.json").read_text()))
    (a1111, a1111_manifest), (compel, compel_manifest) = runs["a1111"], runs["compel"]
    assert a1111_manifest["settings"]["syntax"] == "a1111" and a1111_manifest["maps"]["syntax"] == "a1111"
    assert compel_manifest["settings"]["syntax"] == "compel" and compel_manifest["maps"]["syntax"] == "compel"
    assert compel.words() == ["a", "red", "circle"]  # compel: red weighted 1.1², the text "a red circle"
    assert a1111.words() == ["a", "red", "++", "circle"]  # A1111 reads ++ as text
    assert compel.token_map(0).indices("circle") == [3] and a1111.token_map(0).indices("circle") == [4]
    assert not (compel.word("red", normalize=False) == a1111.word("red", normalize=False)).all()


def test_maps_of_an_and_prompt_draw_each_sub_prompt(sd1_path, tmp_path):
    """AND (composable diffusion): one image, maps per sub-prompt; a --token of the second sub-prompt is the focus."""
    single, composed = tmp_path / "single", tmp_path / "composed"
    assert invoke("maps", "a red cat", "--model", sd1_path, "--out", single, *FAST).exit_code == 0
    result = invoke("maps", "a red cat AND a blue dog", "--model", sd1_path, "--out", composed, "--per-step",
                    "--token", "dog", "--token", "red", *FAST)
    assert result.exit_code == 0, result.output
    maps = load_maps(composed)
    assert [text.strip() for text in maps.prompts] == ["a red cat", "a blue dog"] and maps.images_per_prompt == 1
    assert maps.words(1) == ["a", "blue", "dog"] and maps.word("dog", prompt=1).shape == (32, 32)
    assert not (composed / "image-1.png").exists()
    from PIL import Image
    one, both = Image.open(single / "words.png"), Image.open(composed / "words.png")
    assert both.height > one.height  # two grids stacked (one panel per shown word in each)
    report = (composed / "report.html").read_text()
    assert "a red cat" in report and "a blue dog" in report
    manifest = json.loads((composed / "manifest.json").read_text())
    assert manifest["maps"]["focus_word"] == "dog" and (composed / "steps.png").exists()

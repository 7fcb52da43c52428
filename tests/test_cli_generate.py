"""`xattn generate` and `xattn sites` through the CLI, on a tiny saved pipeline."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from xattn import pngmeta

FAST = ["--steps", "2", "--size", "32", "--no-progress"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_help_lists_commands_with_examples(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("generate", "sites", "sweep"):
        assert command in result.output
    assert "$ xattn generate" in result.output
    generate_help = cli("generate", "--help").output
    for option in ("--model", "--device", "--dtype", "--scheduler", "--seed", "--steps", "--guidance",
                   "--size", "--out", "--config", "--from-png"):
        assert option in generate_help
    assert "Examples:" in generate_help


def test_generate_writes_png_and_manifest(cli, sd1_path, tmp_path):
    result = cli("generate", "a red circle", "--model", sd1_path, "--seed", 5, "--images", 2, *FAST)
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "outputs").iterdir()
    assert folder.name.startswith("generate-") and folder.name.endswith("-a-red-circle")
    assert sorted(p.name for p in folder.iterdir()) == ["image-0.png", "image-1.png", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["settings"]["seed"] == 5 and manifest["settings"]["steps"] == 2
    assert manifest["model"]["path"] == str(sd1_path)
    assert manifest["versions"]["diffusers"] and manifest["timings"]["generate"] > 0
    second = pngmeta.read_parameters(folder / "image-1.png")
    assert (second["seed"], second["steps"], second["width"], second["sampler"]) == (6, 2, 32, "DDIM")


def test_same_command_twice_is_bit_identical(cli, sd1_path, tmp_path):
    for out in ("a", "b"):
        result = cli("generate", "a blue square", "--model", sd1_path, "--seed", 9, "--out", out, *FAST)
        assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "a" / "image-0.png"), pixels(tmp_path / "b" / "image-0.png"))


def test_png_reproduces_from_its_parameters(cli, sd1_path, tmp_path):
    result = cli("generate", "a red circle, big", "--model", sd1_path, "--seed", 4, "--guidance", 3.5,
                 "--scheduler", "euler", "-n", "blurry", "--out", "first", *FAST)
    assert result.exit_code == 0, result.output
    original = tmp_path / "first" / "image-0.png"
    result = cli("generate", "--from-png", original, "--out", "again", "--no-progress")
    assert result.exit_code == 0, result.output
    again = tmp_path / "again" / "image-0.png"
    assert np.array_equal(pixels(original), pixels(again))
    params = pngmeta.read_parameters(again)
    assert (params["prompt"], params["negative_prompt"], params["cfg_scale"], params["sampler"]) == (
        "a red circle, big", "blurry", 3.5, "Euler")


def test_png_matches_an_independent_diffusers_call(cli, sd1_path, tmp_path):
    import diffusers

    assert cli("generate", "a red circle", "--model", sd1_path, "--seed", 2, "--out", "o", *FAST).exit_code == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, width=32, height=32,
                     generator=torch.Generator().manual_seed(2)).images[0]
    assert np.array_equal(pixels(tmp_path / "o" / "image-0.png"), np.asarray(reference))


def test_config_fills_options_and_command_line_wins(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text(f"model: {sd1_path}\nsteps: 3\nguidance: 2.5\nsize: 32\nseed: 8\n")
    result = cli("generate", "a red circle", "--config", "c.yaml", "--steps", 2, "--out", "o", "--no-progress")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "o" / "manifest.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["seed"], settings["size"]) == (2, 2.5, 8, "32x32")


def test_model_defaults_file_is_used(cli, sd1_path, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sd1_path, model)
    (model / "xattn_defaults.json").write_text(json.dumps({"steps": 3, "guidance": 4.0, "size": 32}))
    assert cli("generate", "x", "--model", model, "--out", "o", "--no-progress").exit_code == 0
    settings = json.loads((tmp_path / "o" / "manifest.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["size"]) == (3, 4.0, "32x32")


# -- errors -------------------------------------------------------------------------------

def test_missing_model_is_a_clear_error(cli, tmp_path):
    result = cli("generate", "x", "--model", tmp_path / "nowhere", *FAST)
    assert result.exit_code == 2
    assert "Error: model folder" in result.output and "nowhere" in result.output
    assert not (tmp_path / "outputs").exists()


def test_uncached_hub_id_is_a_clear_error_offline(cli, monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    result = cli("generate", "x", "--model", "nobody/nothing", *FAST)
    assert result.exit_code == 2
    assert "nobody/nothing" in result.output and "HF_HUB_OFFLINE" in result.output


def test_bad_config_key_is_named(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text("stpes: 3\n")
    result = cli("generate", "x", "--model", sd1_path, "--config", "c.yaml", *FAST)
    assert result.exit_code == 2 and "unknown key 'stpes'" in result.output


def test_bad_selector_in_config_is_named(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text('sites: "kind=sideways"\n')
    result = cli("maps", "x", "--model", sd1_path, "--config", "c.yaml", *FAST)
    assert result.exit_code == 2 and "key 'sites'" in result.output and "sideways" in result.output


def test_sites_in_a_generate_config_is_said_unused_and_not_recorded(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text('sites: "kind=cross res=16"\n')
    result = cli("generate", "x", "--model", sd1_path, "--config", "c.yaml", "--out", "g", *FAST)
    assert result.exit_code == 0 and "key 'sites' is for other commands" in result.output
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["settings"]["sites"] is None


def test_existing_output_folder_is_refused_and_kept(cli, sd1_path, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    result = cli("generate", "x", "--model", sd1_path, "--out", out, *FAST)
    assert result.exit_code == 2 and "exists" in result.output and "pass a new folder" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_option_values(cli, sd1_path):
    assert cli("generate", "x", "--model", sd1_path, "--scheduler", "dpm9").exit_code == 2
    result = cli("generate", "x", "--model", sd1_path, "--size", "33", "--steps", "2")
    assert result.exit_code == 2 and "size" in result.output
    result = cli("generate", "--model", sd1_path)
    assert result.exit_code == 2 and "no prompt" in result.output


def test_from_png_without_parameters(cli, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = cli("generate", "--from-png", tmp_path / "plain.png")
    assert result.exit_code == 2 and "parameters" in result.output


# -- sites ----------------------------------------------------------------------------------

def test_sites_prints_every_site(cli, sd1_path):
    from diffusers import UNet2DConditionModel

    result = cli("sites", sd1_path)
    assert result.exit_code == 0, result.output
    unet = UNet2DConditionModel.from_pretrained(sd1_path / "unet")
    expected = [key.removesuffix(".processor") for key in unet.attn_processors]
    listed = [line.split()[0] for line in result.stdout.strip().splitlines()[2:]]
    assert sorted(listed) == sorted(expected)
    cross = cli("sites", "--model", sd1_path, "--kind", "cross").stdout.strip().splitlines()[2:]
    assert {line.split()[0] for line in cross} == {n for n in expected if n.endswith("attn2")}


def test_sites_missing_model(cli, tmp_path):
    result = cli("sites", tmp_path / "nothing")
    assert result.exit_code == 2 and "nothing" in result.output


def test_a_run_failing_before_it_writes_leaves_no_folder(cli, sd1_path, tmp_path, monkeypatch):
    from xattn.app import runner as runner_module

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner_module, "generate", broken)
    result = cli("generate", "x", "--model", sd1_path, "--out", "o", *FAST)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)  # a bug keeps its traceback
    assert not (tmp_path / "o").exists()


def test_a_failed_run_is_marked_failed_and_its_out_reused(cli, sd1_path, tmp_path, monkeypatch):
    from xattn.cli import common

    real, calls = common.image_parameters, []

    def fails_on_the_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk trouble")
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "image_parameters", fails_on_the_second_image)
    result = cli("generate", "x", "--model", sd1_path, "--out", "o", "--images", 2, *FAST)
    assert result.exit_code != 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "disk trouble" in manifest["error"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["image-0.png", "manifest.json"]
    monkeypatch.setattr(common, "image_parameters", real)
    again = cli("generate", "x", "--model", sd1_path, "--out", "o", "--images", 2, *FAST)
    assert again.exit_code == 0, again.output
    assert "reusing --out" in again.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["image-0.png", "image-1.png", "manifest.json"]


def test_config_beats_an_option_default_but_not_a_typed_option(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text(f"model: {sd1_path}\nsteps: 2\nsize: 32\nimages: 2\n")
    assert cli("generate", "x", "--config", "c.yaml", "--out", "a", "--no-progress").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["image-0.png", "image-1.png"]
    assert cli("generate", "x", "--config", "c.yaml", "--images", 1, "--out", "b", "--no-progress").exit_code == 0
    assert [p.name for p in (tmp_path / "b").glob("*.png")] == ["image-0.png"]
    (tmp_path / "bad.yaml").write_text("images: many\n")
    result = cli("generate", "x", "--model", sd1_path, "--config", "bad.yaml", *FAST)
    assert result.exit_code == 2 and "key 'images'" in result.output


def test_png_settings_beat_model_defaults_and_typed_options_beat_the_png(cli, sd1_path, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sd1_path, model)
    (model / "xattn_defaults.json").write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 4.0}))
    assert cli("generate", "a red circle", "--model", model, "--steps", 2, "--guidance", 6, "--size", 32,
               "--out", "a", "--no-progress").exit_code == 0
    assert cli("generate", "--from-png", tmp_path / "a" / "image-0.png", "--out", "b", "--no-progress").exit_code == 0
    assert np.array_equal(pixels(tmp_path / "a" / "image-0.png"), pixels(tmp_path / "b" / "image-0.png"))
    assert cli("generate", "--from-png", tmp_path / "a" / "image-0.png", "--seed", 9, "--out", "c",
               "--no-progress").exit_code == 0
    params = pngmeta.read_parameters(tmp_path / "c" / "image-0.png")
    assert (params["seed"], params["steps"], params["cfg_scale"]) == (9, 2, 6.0)


def test_reweight_command_png_is_reproduced(cli, sd1_path, tmp_path):
    result = cli("reweight", "a (red:3) circle", "--model", sd1_path, "--seed", 1, "--out", "r", *FAST)
    assert result.exit_code == 0, result.output
    (original,) = [p for p in (tmp_path / "r").glob("*.png") if p.name != "grid.png"]
    assert "reweight" in pngmeta.read_parameters(original)["xattn"]
    result = cli("generate", "--from-png", original, "--out", "again", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(original), pixels(tmp_path / "again" / "image-0.png"))


def test_edited_png_is_refused_with_a_pointer(cli, tmp_path):
    text = pngmeta.format_parameters(prompt="a blue circle", steps=2, sampler="DDIM", cfg_scale=5, seed=0,
                                     width=32, height=32, xattn={"command": "edit", "edit": {"replace": "red"}})
    Image.new("RGB", (32, 32)).save(tmp_path / "edited.png", pnginfo=pngmeta.png_info(text))
    result = cli("generate", "--from-png", tmp_path / "edited.png")
    assert result.exit_code == 2 and "xattn edit" in result.output

"""Prompts as users type them: accents in either Unicode form and special tokens work in every command;
PNG parameters are checked and name their model only through xattn's own field; maps honour `sites:`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xattn.app import pngmeta, runner
from xattn.tokens import TokenMap

import tiny_models

FAST = ["--steps", "2", "--size", "32", "--no-progress"]
DECOMPOSED = "a cafe\u0301 sign"  # 'e' + COMBINING ACUTE ACCENT
SPECIAL = "a red <|endoftext|> circle"


def test_token_map_reads_text_the_way_clip_does():
    tokenizer = tiny_models.tokenizer()
    decomposed, composed = TokenMap(tokenizer, DECOMPOSED), TokenMap(tokenizer, "a caf\u00e9 sign")
    assert decomposed.indices("caf\u00e9") == composed.indices("cafe\u0301") == [2]
    assert len(tokenizer.tokenize(DECOMPOSED)) == decomposed.end_slot - 1  # every piece has its slot
    special = TokenMap(tokenizer, SPECIAL)
    assert [word.text for word in special.words] == ["a", "red", "<|endoftext|>", "circle"]
    assert special.indices("circle") == [4] and tokenizer.tokenize(SPECIAL)[3] == "circle</w>"


@pytest.mark.parametrize("prompt, word", [(DECOMPOSED, "caf\u00e9"), (SPECIAL, "circle")], ids=["accent", "special"])
def test_maps_and_reweight_accept_the_prompt(cli, sd1_path, tmp_path, prompt, word):
    maps = cli("maps", prompt, "-m", sd1_path, "-t", word, "--out", "m", *FAST)
    assert maps.exit_code == 0, maps.output
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["maps"]["focus_word"] == word
    weighted = cli("reweight", prompt, "-m", sd1_path, "--word", word, "--weights", "0,2", "--out", "r", *FAST)
    assert weighted.exit_code == 0, weighted.output


def test_edit_accepts_an_accented_target(cli, sd1_path):
    result = cli("edit", "--source", "a cafe sign", "--target", DECOMPOSED, "-m", sd1_path, "--out", "e", *FAST)
    assert result.exit_code == 0, result.output


def test_from_png_takes_the_model_from_xattn_only(cli, sd1_path, tmp_path):
    assert cli("generate", "a red circle", "-m", sd1_path, "--out", "g", *FAST).exit_code == 0
    params = pngmeta.read_parameters(tmp_path / "g" / "image-0.png")
    assert params["xattn"]["model"] == str(sd1_path)
    text = pngmeta.format_parameters(  # an A1111 image: a display label in Model:, no xattn field
        prompt="a red circle", steps=2, sampler="DDIM", cfg_scale=5.0, seed=3, width=32, height=32,
        model="/no/such/folder")
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=pngmeta.png_info(text))
    again = cli("generate", "--from-png", "a1111.png", "-m", sd1_path, "--out", "a", "--no-progress")
    assert again.exit_code == 0, again.output  # the label was not taken for a path
    settings = json.loads((tmp_path / "a" / "manifest.json").read_text())["settings"]
    assert settings["model"] == str(sd1_path) and settings["seed"] == 3 and settings["size"] == "32x32"


def test_nul_never_reaches_a_png_chunk():
    with pytest.raises(pngmeta.PngMetadataError, match="NUL"):
        pngmeta.format_parameters(prompt="a\0b", steps=1, sampler="DDIM", cfg_scale=1, seed=0, width=8, height=8)


def test_maps_capture_only_the_configs_sites(cli, sd1_path, tmp_path):
    (tmp_path / "c.yaml").write_text('sites: "kind=cross res=4"\n')
    assert cli("maps", "a red circle", "-m", sd1_path, "-c", "c.yaml", "--out", "m", *FAST).exit_code == 0
    record = json.loads((tmp_path / "m" / "manifest.json").read_text())["maps"]
    assert {tuple(layer["res"]) for layer in record["layers"]} == {(4, 4)}
    assert "res=4" in record["selector"]
    assert cli("maps", "a red circle", "-m", sd1_path, "--out", "all", *FAST).exit_code == 0
    everything = json.loads((tmp_path / "all" / "manifest.json").read_text())["maps"]
    assert len({tuple(layer["res"]) for layer in everything["layers"]}) > 1


def test_commands_show_progress_by_default(cli, sd1_path):
    for command in (["maps", "a red circle"], ["reweight", "a (red:2) circle"],
                    ["edit", "--source", "a red circle", "--target", "a blue circle"]):
        result = cli(*command, "-m", sd1_path, "--steps", "2", "--size", "32")
        assert result.exit_code == 0, result.output
        assert "0/2 [" in result.output, command  # diffusers' step bar, drawn at its start


def test_non_finite_pixels_are_an_error_not_a_black_image(sd1_pipe):
    """An overflow that slips past the checks (here a decoder returning NaN) fails instead of saving black."""
    sd1_pipe.vae.decode = lambda latents, return_dict=False, **kw: (latents.new_full(
        (latents.shape[0], 3, 32, 32), float("nan")),)
    with pytest.raises(runner.NonFiniteImageError, match="seed 7"):
        runner.generate(sd1_pipe, "a red circle", seed=7, steps=1, guidance=5.0, size=32)


def test_generate_keeps_the_pixels_of_output_type_pil(sd1_pipe):
    """Sampling to numpy and converting gives exactly the pipeline's own PIL images."""
    import torch

    ours = runner.generate(sd1_pipe, "a red circle", seed=7, steps=2, guidance=5.0, size=32)[0]
    theirs = sd1_pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                      generator=[torch.Generator("cpu").manual_seed(7)]).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))

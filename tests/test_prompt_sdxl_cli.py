"""`xattn generate` with prompt editing and AND on an SDXL model folder: the PNG is the hand-written loop's image,
and the UNet gets the pooled vector of each step's text."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

import tiny_models
from test_prompt_sdxl_runs import _encode, _reference
from xattn.prompts import texts_by_step

STEPS = 3
FAST = ["--steps", str(STEPS), "--size", "32", "--seed", "2", "--no-progress"]


def _decoded(pipe, latents) -> np.ndarray:
    """Latents to 8-bit pixels, as the pipeline's own decode and numpy_to_pil do."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    array = pipe.image_processor.postprocess(image, output_type="np")[0]
    return (array * 255).round().astype("uint8").astype(int)


@pytest.fixture
def unet_inputs(monkeypatch):
    """The pooled vectors every UNet call receives (after every pre-hook), in call order."""
    seen = []
    forward = UNet2DConditionModel.forward

    @functools.wraps(forward)
    def recording(self, *args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["text_embeds"].detach().clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    return seen


def _run(cli, tmp_path, sdxl_path, prompt):
    result = cli("generate", prompt, "--model", sdxl_path, "--out", "run", *FAST)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(tmp_path / "run" / "image-0.png").convert("RGB")).astype(int)


def test_generate_edits_the_prompt_on_sdxl(cli, sdxl_path, tmp_path, unet_inputs, monkeypatch):
    pixels = _run(cli, tmp_path, sdxl_path, "a [red:blue:0.5] circle")
    pipe = tiny_models.load_sdxl(sdxl_path)
    texts = ["a red circle", "a red circle", "a blue circle"]  # boundary int(0.5 * 3) = 1: steps 0 and 1 are red
    assert texts_by_step("a [red:blue:0.5] circle", STEPS) == texts
    assert len(unet_inputs) == STEPS and all(rows.shape[0] == 2 for rows in unet_inputs)  # [negative, prompt]
    for step, text in enumerate(texts):
        assert torch.allclose(unet_inputs[step][1], _encode(pipe, text)[1][0], atol=1e-6)
        assert not unet_inputs[step][0].any()  # the empty negative prompt is zeros, as diffusers and A1111 make it
    monkeypatch.setattr("test_prompt_sdxl_runs.SEED", 2)
    expected = _decoded(pipe, _reference(pipe, [(texts, 1.0)], 5.0, steps=STEPS))
    assert np.abs(pixels - expected).max() <= 1  # float32: the loop's separate UNet calls round differently


def test_generate_composes_on_sdxl(cli, sdxl_path, tmp_path, unet_inputs, monkeypatch):
    pixels = _run(cli, tmp_path, sdxl_path, "a red circle AND a blue square :0.7")
    pipe = tiny_models.load_sdxl(sdxl_path)
    assert all(rows.shape[0] == 3 for rows in unet_inputs)  # one pass: [negative, sub-prompt 0, sub-prompt 1]
    assert torch.allclose(unet_inputs[0][2], _encode(pipe, "a blue square")[1][0], atol=1e-6)
    monkeypatch.setattr("test_prompt_sdxl_runs.SEED", 2)
    parts = [(["a red circle"] * STEPS, 1.0), (["a blue square"] * STEPS, 0.7)]
    assert np.abs(pixels - _decoded(pipe, _reference(pipe, parts, 5.0, steps=STEPS))).max() <= 1
    alone = _decoded(pipe, _reference(pipe, parts[:1], 5.0, steps=STEPS))
    assert np.abs(pixels - alone).max() > 8  # the second sub-prompt shows in the image


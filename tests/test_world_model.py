"""The shipped shapes-world model: loads offline as a plain SD pipeline and works.

These tests need the committed weights in src/xattn/world/model/; they do not
skip when the weights are missing (a missing model is a failure).
"""
import json
import os
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from xattn.world import COLORS, model_path  # noqa: E402


@pytest.fixture(scope="module")
def pipe(world_pipe):
    return world_pipe


@pytest.fixture(scope="module")
def defaults():
    return json.loads((model_path() / "xattn_defaults.json").read_text())


def test_folder_is_small_and_complete():
    folder = model_path()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 1024 * 1024, f"model folder is {size / 2**20:.1f} MiB"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert (folder / "README.md").is_file()
    assert list(folder.rglob("*.safetensors"))


def test_loads_as_plain_fp32_pipeline(defaults):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path(), use_safetensors=True)  # as the model card shows
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert defaults["height"] == defaults["width"] == 64
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_tokenizer_is_real_clip(pipe):
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_generates_64px_image_fast(pipe, defaults):
    gen = torch.Generator().manual_seed(0)
    pipe("a red circle", num_inference_steps=2, generator=gen, output_type="np")  # warm-up
    t0 = time.time()
    out = pipe("a red circle and a blue square", num_inference_steps=25,
               guidance_scale=defaults["guidance_scale"], generator=torch.Generator().manual_seed(0),
               output_type="np")
    seconds = time.time() - t0
    img = out.images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    assert seconds < 3.0, f"25 steps took {seconds:.2f} s"  # ~0.5 s on an idle core


def test_single_prompt_draws_its_colour(pipe, defaults):
    from xattn.world.evaluate import dominant_color, generate
    imgs = generate(pipe, "a yellow circle", [0, 1, 2, 3], defaults["guidance_scale"],
                    defaults["num_inference_steps"])
    assert sum(dominant_color(i) == "yellow" for i in imgs) >= 3
    assert set(COLORS) >= {"yellow"}

"""The shipped shapes-world model: loads offline as a plain SD pipeline and works.

These tests need the committed weights in src/xattn/world/model/; they do not
skip when the weights are missing (a missing model is a failure).
"""
import json

import numpy as np
import torch

from xattn.world import model_path, segment


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


def test_loads_as_plain_fp32_pipeline(world_defaults):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path(), use_safetensors=True)  # as the model card shows
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert world_defaults["height"] == world_defaults["width"] == 64
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_tokenizer_is_real_clip(world_pipe):
    assert world_pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_generates_a_64px_picture_of_its_prompt(world_pipe, world_defaults):
    # Speed (25 steps, batch 1) is measured by scripts/eval_world.py, not asserted here.
    out = world_pipe("a red circle and a blue square", num_inference_steps=world_defaults["num_inference_steps"],
                     guidance_scale=world_defaults["guidance_scale"], generator=torch.Generator().manual_seed(0),
                     output_type="np")
    img = out.images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    pixels = (img * 255).round().astype(np.uint8)
    assert segment(pixels, "red").sum() >= 40 and segment(pixels, "blue").sum() >= 40  # both named colours drawn


def test_single_prompt_draws_its_colour(world_pipe, world_defaults):
    from xattn.world.measure import dominant_color, generate
    imgs = generate(world_pipe, "a yellow circle", [0, 1, 2, 3], world_defaults["guidance_scale"],
                    world_defaults["num_inference_steps"])
    assert sum(dominant_color(i) == "yellow" for i in imgs) >= 3

"""The pipelines people run beside text-to-image: img2img and inpainting, LoRA-free fp16/bf16, offloading.

Each is a tiny random-weight pipeline loaded with ``from_pretrained`` from the
saved SD 1.x / SDXL fixtures; hooks must leave stock output unchanged, count
only the steps that actually run, and see what the pipeline encoded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

import xattn


def _image(size=32, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _steps_seen(pipe, **call):
    seen = []
    hook = xattn.Hook("value_scale", lambda x, ctx: seen.append((ctx.step, ctx.num_steps)), "kind=cross")
    with xattn.hooks(pipe, hook):
        out = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    return sorted(set(seen)), out


@pytest.mark.parametrize("strength, expected_steps", [(1.0, 10), (0.5, 5), (0.3, 3)])
def test_img2img_counts_the_steps_that_run_from_zero(sd1_path, strength, expected_steps):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd1_path, safety_checker=None)
    steps, _ = _steps_seen(pipe, prompt="a red circle", image=_image(), strength=strength,
                           num_inference_steps=10, guidance_scale=5.0)
    assert steps == [(s, expected_steps) for s in range(expected_steps)]


def test_img2img_with_no_hooks_matches_stock(sd1_path):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd1_path, safety_checker=None)
    call = dict(prompt="a red circle", image=_image(), strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                output_type="latent")
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with xattn.hooks(pipe, xattn.Hook("value_scale", lambda x, ctx: None)):
        hooked = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(hooked, stock, rtol=0, atol=1e-5)


def test_sdxl_img2img_layout_and_steps(sdxl_path):
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_path)
    runs = []

    class Runs(xattn.Controller):
        selector = xattn.Selector.coerce("kind=cross")

        def begin_run(self, run):
            runs.append(run)

        def value_scale(self, x, ctx):
            return None

    with xattn.hooks(pipe, Runs()):
        pipe(prompt=["a red circle", "a blue square"], image=_image(), strength=0.5, num_inference_steps=6,
             guidance_scale=5.0, output_type="latent")
    (run,) = runs
    assert run.num_steps == 3 and run.layout.num_prompts == 2 and len(run.layout.uncond_rows()) == 2


def test_the_inpainting_unet_is_hooked_like_any_other(tmp_path):
    import tiny_models

    unet = tiny_models.sd1_unet()
    config = {**unet.config, "in_channels": 9}
    inpaint_unet = type(unet).from_config(config)
    path = tiny_models.build_sd(tmp_path / "inpaint", inpaint_unet)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None)
    mask = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 32 > 16).astype(np.uint8) * 255)
    call = dict(prompt="a red circle", image=_image(), mask_image=mask, num_inference_steps=3,
                guidance_scale=5.0, height=32, width=32)
    stock = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    steps, hooked = _steps_seen(pipe, **call)
    assert steps == [(s, 3) for s in range(3)]
    torch.testing.assert_close(hooked, stock, rtol=0, atol=1e-5)
    capture = xattn.Capture()
    with xattn.hooks(pipe, capture):
        pipe(**call, output_type="latent")
    assert capture.maps().word("circle").shape[-2:] == (32, 32)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2)])
def test_low_precision_weights_match_stock_within_the_stated_tolerance(sd1_path, dtype, tolerance):
    """bf16 on the CPU: xattn's fused path against diffusers' own, same weights and dtype."""
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd1_path, safety_checker=None, torch_dtype=dtype)
    call = dict(prompt="a red circle", image=_image(), strength=0.8, num_inference_steps=3, guidance_scale=5.0,
                output_type="latent")
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with xattn.hooks(pipe, xattn.Reweight({"red": 1.0})):  # weight 1: the same attention, through xattn's path
        hooked = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert hooked.dtype == dtype
    torch.testing.assert_close(hooked.float(), stock.float(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("controllers", [lambda: [], lambda: [xattn.Reweight({"red": 2.0})],
                                         lambda: [xattn.Reweight({"red": 2.0}, mode="bias"), xattn.SelfInject(1.0)]])
def test_torch_compile_with_xattn_installed_gives_the_same_images_and_compiles_once(sd1_path, controllers):
    """Fused paths under torch.compile: xattn's bookkeeping runs eagerly, so no step adds a graph."""
    import torch._dynamo

    def compiled_graphs(steps):
        torch._dynamo.reset()
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd1_path, safety_checker=None)
        call = dict(prompt=["a red circle", "a red square"], image=_image(), strength=1.0, guidance_scale=5.0,
                    num_inference_steps=steps, output_type="latent")
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward

        with xattn.hooks(pipe, xattn.Hook("value_scale", lambda x, ctx: None), *controllers()):
            eager = pipe(**call, generator=torch.Generator().manual_seed(0)).images
            pipe.unet = torch.compile(pipe.unet, backend=backend)
            first = pipe(**call, generator=torch.Generator().manual_seed(0)).images
            after_first = len(graphs)
            second = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        torch.testing.assert_close(first, eager, rtol=0, atol=1e-5)
        torch.testing.assert_close(second, eager, rtol=0, atol=1e-5)
        return after_first, len(graphs) - after_first

    two_steps, again = compiled_graphs(2)
    four_steps, _ = compiled_graphs(4)
    assert again == 0  # a second call compiles nothing
    assert four_steps == two_steps  # and more steps compile nothing more


# -- memory settings: VAE slicing and tiling, model CPU offload; attention slicing and xformers refused ------

MEMORY_CALL = dict(prompt=["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=5.0,
                   height=64, width=64, output_type="np")


def _vae_memory_settings(pipe):
    """VAE slicing (one image at a time) and tiling: the pipeline's methods where diffusers still has them."""
    for pipe_method, vae_method in (("enable_vae_slicing", "enable_slicing"), ("enable_vae_tiling", "enable_tiling")):
        getattr(pipe, pipe_method, getattr(pipe.vae, vae_method))()
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    return pipe


def test_vae_slicing_and_tiling_give_stock_output_with_the_same_setting(sd1_path):
    from tiny_models import load_sd

    plain = load_sd(sd1_path)(**MEMORY_CALL, generator=torch.Generator().manual_seed(0)).images
    pipe = _vae_memory_settings(load_sd(sd1_path))
    stock = pipe(**MEMORY_CALL, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(stock - plain).max() > 0  # 64 px: latents of 32 > the tiny VAE's 16-latent tile, so tiles ran
    capture = xattn.Capture()
    with xattn.hooks(pipe, capture):
        hooked = pipe(**MEMORY_CALL, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(hooked, stock, rtol=0, atol=1e-5)
    assert capture.maps().word("circle").isfinite().all()  # the maps were taken on the same run


@pytest.mark.parametrize("session_first", [False, True])
def test_model_cpu_offload_with_a_cpu_device_gives_stock_output(sd1_path, session_first):
    """``enable_model_cpu_offload(device="cpu")`` runs here (accelerate's hooks move each model to the device
    before its forward); the hooks xattn puts on the UNet and accelerate's live side by side, in either order.
    What offload saves (GPU memory) needs an accelerator and is not measured here."""
    from tiny_models import load_sd

    plain = load_sd(sd1_path)(**MEMORY_CALL, generator=torch.Generator().manual_seed(0)).images
    pipe = load_sd(sd1_path)
    steps = []
    hook = xattn.Hook("value_scale", lambda x, ctx: steps.append(ctx.step), "kind=cross")
    session = xattn.hooks(pipe, hook)
    if session_first:
        session.__enter__()
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook") and pipe._execution_device.type == "cpu"
    stock_offloaded = None
    if not session_first:
        stock_offloaded = pipe(**MEMORY_CALL, generator=torch.Generator().manual_seed(0)).images
        session.__enter__()
    try:
        hooked = pipe(**MEMORY_CALL, generator=torch.Generator().manual_seed(0)).images
    finally:
        session.__exit__(None, None, None)
    np.testing.assert_allclose(hooked, plain, rtol=0, atol=1e-5)
    if stock_offloaded is not None:
        np.testing.assert_allclose(stock_offloaded, plain, rtol=0, atol=1e-5)
    assert sorted(set(steps)) == [0, 1]
    assert not any(type(p).__module__.startswith("xattn") for p in pipe.unet.attn_processors.values())


def test_attention_slicing_and_xformers_are_refused_by_name_saying_what_to_undo(sd1_path):
    from diffusers.models.attention_processor import XFormersAttnProcessor

    from tiny_models import load_sd

    pipe = load_sd(sd1_path)
    pipe.enable_attention_slicing()
    with pytest.raises(xattn.UnsupportedProcessorError, match=r"SlicedAttnProcessor.*disable_attention_slicing\(\)"):
        xattn.hooks(pipe).__enter__()
    pipe.disable_attention_slicing()
    # enable_xformers_memory_efficient_attention needs the xformers package; the processor it installs:
    pipe.unet.set_attn_processor(XFormersAttnProcessor())
    with pytest.raises(xattn.UnsupportedProcessorError,
                       match=r"XFormersAttnProcessor.*disable_xformers_memory_efficient_attention\(\)"):
        xattn.hooks(pipe).__enter__()
    pipe.unet.set_default_attn_processor()
    with xattn.hooks(pipe):
        pipe(**MEMORY_CALL)

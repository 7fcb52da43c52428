"""ControlNet: its sites beside the UNet's, one step clock, reweighting on both unless excluded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

import tiny_models
import xattn


@pytest.fixture(scope="module")
def controlnet_path(tmp_path_factory, sd1_path):
    pipe = tiny_models.load_sd(sd1_path)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(1)
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: give them weight
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            module.weight.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("controlnet")
    full = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    full.save_pretrained(path, safe_serialization=True)
    return path


def _pipe(path, several=False):
    pipe = StableDiffusionControlNetPipeline.from_pretrained(path, safety_checker=None)
    if several:
        pipe.controlnet = MultiControlNetModel([pipe.controlnet, ControlNetModel.from_config(pipe.controlnet.config)])
    return pipe


def _control(n=1):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels) if n == 1 else [Image.fromarray(pixels)] * n


CALL = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
            output_type="latent")


def test_controlnet_sites_are_named_under_the_pipeline(controlnet_path):
    pipe = _pipe(controlnet_path)
    names = [site.name for site in xattn.sites(pipe)]
    unet_names = [site.name for site in xattn.sites(pipe.unet)]
    control = [name for name in names if name.startswith("controlnet.")]
    assert names[: len(unet_names)] == unet_names and control
    assert {name[len("controlnet."):] for name in control} == {s.name for s in xattn.sites(pipe.controlnet)}
    several = [s.name for s in xattn.sites(_pipe(controlnet_path, several=True))]
    assert any(n.startswith("controlnet.nets.1.") for n in several)


def test_no_hooks_match_stock_and_processors_come_back(controlnet_path):
    pipe = _pipe(controlnet_path)
    before = {**pipe.unet.attn_processors, **{"cn." + k: v for k, v in pipe.controlnet.attn_processors.items()}}
    stock = pipe(**CALL, image=_control(), generator=torch.Generator().manual_seed(0)).images
    with xattn.hooks(pipe, xattn.Hook("value_scale", lambda x, ctx: None)):
        hooked = pipe(**CALL, image=_control(), generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(hooked, stock, rtol=0, atol=1e-5)
    after = {**pipe.unet.attn_processors, **{"cn." + k: v for k, v in pipe.controlnet.attn_processors.items()}}
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_one_clock_and_reweighting_on_both_unless_excluded(controlnet_path, guess_mode):
    pipe = _pipe(controlnet_path)
    red = xattn.TokenMap(pipe.tokenizer, CALL["prompt"]).indices("red")[0]

    def run(reweight):
        seen = []

        def look(x, ctx):
            cond = ctx.layout.cond_rows()
            seen.append((ctx.site.name.startswith("controlnet."), ctx.step, x.shape[0], len(cond),
                         float(x[cond][:, red].min()), float(x[ctx.layout.uncond_rows()][:, red].min()) if
                         ctx.layout.uncond_rows() else None))

        with xattn.hooks(pipe, reweight, xattn.Hook("value_scale", look, "kind=cross")):
            pipe(**CALL, image=_control(), guess_mode=guess_mode)
        return seen

    both = run(xattn.Reweight({"red": 0.25}))
    assert {(is_cn, step) for is_cn, step, *_ in both} == {(flag, s) for flag in (True, False) for s in range(3)}
    for is_cn, step, rows, cond_rows, cond_weight, uncond_weight in both:
        assert cond_weight == 0.25 and uncond_weight in (None, 1.0)
        assert rows == (1 if (is_cn and guess_mode) else 2) and cond_rows == 1
    unet_only = run(xattn.Reweight({"red": 0.25}, selector="sites=!controlnet.*"))
    assert {w for is_cn, *_, w, _ in unet_only if is_cn} == {1.0}
    assert {w for is_cn, *_, w, _ in unet_only if not is_cn} == {0.25}


def test_capture_reads_maps_from_unet_controlnet_or_both(controlnet_path):
    pipe = _pipe(controlnet_path)
    control_only, unet_only = xattn.Capture("sites=controlnet.*", per_step=True), xattn.Capture("sites=!controlnet.*")
    with xattn.hooks(pipe, control_only, unet_only):
        pipe(**CALL, image=_control())
    control_sites = {s for layer in control_only.maps().layers for s in layer.sites}
    unet_sites = {s for layer in unet_only.maps().layers for s in layer.sites}
    assert control_sites and all(s.startswith("controlnet.") for s in control_sites)
    assert unet_sites and not any(s.startswith("controlnet.") for s in unet_sites)
    assert control_only.maps().word("circle").shape == unet_only.maps().word("circle").shape


def test_several_controlnets_are_hooked(controlnet_path):
    pipe = _pipe(controlnet_path, several=True)
    names = set()
    with xattn.hooks(pipe, xattn.Hook("value_scale", lambda x, ctx: names.add(ctx.site.name.split(".down")[0]),
                                      "sites=controlnet.*")):
        pipe(**CALL, image=_control(2), controlnet_conditioning_scale=[1.0, 0.5])
    assert {"controlnet.nets.0", "controlnet.nets.1"} <= names


def test_guidance_with_a_controlnet_is_refused_by_name(controlnet_path):
    from xattn.guide import Excite, Guide
    from xattn.lifecycle import LifecycleError

    pipe = _pipe(controlnet_path)
    with xattn.hooks(pipe, Guide(Excite("circle"))):
        with pytest.raises(LifecycleError, match="ControlNetModel runs before its denoiser"):
            pipe(**CALL, image=_control())

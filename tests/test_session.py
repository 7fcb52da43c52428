"""Sessions: scoped install/restore, the step clock and the batch layout."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

import xattn
from xattn.processor import XattnProcessor


def _record(point="value_scale", selector="kind=cross"):
    seen = []
    hook = xattn.Hook(point, lambda x, ctx: seen.append(ctx), selector=selector)
    return hook, seen


def _forward_hook_count(module):
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


# -- scope ----------------------------------------------------------------------

def test_session_restores_exact_processors_and_hooks(sd1_pipe):
    unet = sd1_pipe.unet
    before = dict(unet.attn_processors)
    hooks_before = _forward_hook_count(unet)
    with xattn.hooks(sd1_pipe, _record()[0]):
        assert any(isinstance(p, XattnProcessor) for p in unet.attn_processors.values())
        assert "encode_prompt" in vars(sd1_pipe)
    after = unet.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert _forward_hook_count(unet) == hooks_before
    assert "encode_prompt" not in vars(sd1_pipe)


def test_session_restores_after_exception(sd1_pipe):
    unet = sd1_pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with xattn.hooks(sd1_pipe, _record()[0]):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[name] is before[name] for name in before)
    assert _forward_hook_count(unet) == 0


def test_nested_sessions_add_and_remove_only_their_own(sd1_pipe):
    unet = sd1_pipe.unet
    before = dict(unet.attn_processors)
    outer, outer_seen = _record(selector="kind=cross res=8")
    inner, inner_seen = _record(selector="kind=self")
    with xattn.hooks(sd1_pipe, outer):
        installed_outer = {n for n, p in unet.attn_processors.items() if isinstance(p, XattnProcessor)}
        with xattn.hooks(sd1_pipe, inner):
            sd1_pipe("a cat", num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
        assert {n for n, p in unet.attn_processors.items() if isinstance(p, XattnProcessor)} == installed_outer
        outer_count, inner_count = len(outer_seen), len(inner_seen)
        sd1_pipe("a cat", num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
        assert len(inner_seen) == inner_count  # the inner controller is gone
        assert len(outer_seen) > outer_count  # the outer one still runs
    assert inner_count > 0 and outer_count > 0
    assert all(unet.attn_processors[name] is before[name] for name in before)
    assert _forward_hook_count(unet) == 0


def test_only_selected_sites_get_our_processor(sd1_pipe):
    unet = sd1_pipe.unet
    hook, _ = _record(selector="sites=up_blocks.*")
    with xattn.hooks(sd1_pipe, hook):
        ours = {n.removesuffix(".processor") for n, p in unet.attn_processors.items() if isinstance(p, XattnProcessor)}
    assert ours and all(name.startswith("up_blocks.") for name in ours)


def test_non_controller_is_refused(sd1_pipe):
    with pytest.raises(TypeError, match="xattn.Hook"):
        xattn.hooks(sd1_pipe, lambda x, ctx: None)


# -- step clock -------------------------------------------------------------------

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
}


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_step_indices_are_zero_to_n_minus_one(sd1_pipe, name, guidance):
    sd1_pipe.scheduler = SCHEDULERS[name].from_config(sd1_pipe.scheduler.config)
    steps = 4
    unet_calls = []
    handle = sd1_pipe.unet.register_forward_pre_hook(lambda m, a: unet_calls.append(1))
    hook, seen = _record(selector="kind=cross res=4")  # one cross site per UNet call at 4x4
    try:
        with xattn.hooks(sd1_pipe, hook):
            sd1_pipe("a cat", num_inference_steps=steps, guidance_scale=guidance, height=32, width=32)
    finally:
        handle.remove()
    recorded = [ctx.step for ctx in seen]
    assert len(recorded) == len(unet_calls)  # one record per UNet call
    assert sorted(set(recorded)) == list(range(steps))
    assert recorded == sorted(recorded)  # the clock never runs backwards
    assert {ctx.num_steps for ctx in seen} == {steps}
    if name == "heun":
        assert len(unet_calls) == 2 * steps - 1  # two calls per step, except the last


def test_fractional_step_selector_picks_the_right_steps(sd1_pipe):
    hook, seen = _record(selector="kind=cross res=4 steps=0.5:1.0")
    with xattn.hooks(sd1_pipe, hook):
        sd1_pipe("a cat", num_inference_steps=10, guidance_scale=1.0, height=32, width=32)
    assert sorted({ctx.step for ctx in seen}) == [5, 6, 7, 8, 9]


# -- batch layout ------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_layout_for_two_prompts_two_images(sd1_pipe, guidance):
    prompts = ["a red circle", "a blue square"]
    seen_text = {}

    def remember(x, ctx):
        seen_text["layout"], seen_text["text"] = ctx.layout, x.clone()

    with xattn.hooks(sd1_pipe, xattn.Hook("context", remember, selector="kind=cross res=4")):
        sd1_pipe(prompts, num_images_per_prompt=2, num_inference_steps=1, guidance_scale=guidance, height=32, width=32)
    layout, text = seen_text["layout"], seen_text["text"]
    cfg = guidance > 1.0
    assert layout.batch_size == (8 if cfg else 4)
    cond, uncond = sd1_pipe.encode_prompt(prompts, "cpu", 1, True, None)
    for r, row in enumerate(layout.rows):  # each row's text is what the layout says it is
        expected = cond[row.prompt] if row.cond else uncond[row.prompt]
        assert torch.equal(text[r], expected)
    assert sorted((row.cond, row.prompt, row.image) for row in layout.rows) == sorted(
        (c, p, i) for c in ([False, True] if cfg else [True]) for p in range(2) for i in range(2)
    )
    if cfg:  # diffusers puts the unconditional half first
        assert [row.cond for row in layout.rows] == [False] * 4 + [True] * 4
    assert layout.prompts == tuple(prompts)
    assert layout.token_map(1).indices("square") == [3]


def test_layout_of_bare_unet_call_is_plain_and_words_need_prompts(sd1_pipe):
    unet = sd1_pipe.unet
    hook, seen = _record(selector="kind=cross res=4")
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with xattn.hooks(unet, hook):
        unet(torch.randn(2, 4, 16, 16), torch.tensor(10), text)
    layout = seen[0].layout
    assert [(row.cond, row.prompt) for row in layout.rows] == [(True, 0), (True, 1)]
    with pytest.raises(LookupError, match="prompts="):
        layout.token_map(0)
    with xattn.hooks(unet, hook, prompts=["a cat", "a dog"], tokenizer=sd1_pipe.tokenizer):
        unet(torch.randn(2, 4, 16, 16), torch.tensor(10), text)
    assert seen[-1].layout.token_map(1).indices("dog") == [2]


def test_sdxl_pipeline_layout_and_steps(sdxl_pipe):
    hook, seen = _record(selector="kind=cross")
    with xattn.hooks(sdxl_pipe, hook):
        sdxl_pipe(["a red circle", "a cat"], num_inference_steps=3, guidance_scale=5.0, height=32, width=32)
    assert sorted({ctx.step for ctx in seen}) == [0, 1, 2]
    layout = seen[0].layout
    assert sorted((r.cond, r.prompt) for r in layout.rows) == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert layout.token_map(0).indices("circle") == [3]


# -- resolution ------------------------------------------------------------------------

@pytest.mark.parametrize("latent_hw", [(16, 16), (16, 24), (10, 14)])
def test_resolution_matches_the_spatial_map_of_each_site(sd1_pipe, latent_hw):
    """Compare ctx.res with the [b, c, h, w] input of each attention block's Transformer2DModel."""
    unet = sd1_pipe.unet
    modules = dict(unet.named_modules())
    spatial = {}
    handles = []
    for site in xattn.sites(unet):
        parent = site.name.split(".transformer_blocks")[0]  # e.g. down_blocks.0.attentions.0
        handles.append(modules[parent].register_forward_pre_hook(
            lambda m, a, kw, parent=parent: spatial.__setitem__(parent, tuple((a[0] if a else kw["hidden_states"]).shape[-2:])),
            with_kwargs=True))
    hook, seen = _record(selector="kind=all")
    try:
        with xattn.hooks(unet, hook):
            unet(torch.randn(1, 4, *latent_hw), torch.tensor(10), torch.randn(1, 77, unet.config.cross_attention_dim))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(xattn.sites(unet))
    for ctx in seen:
        assert ctx.res == spatial[ctx.site.name.split(".transformer_blocks")[0]], ctx.site.name

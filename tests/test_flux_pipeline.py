"""A tiny FluxPipeline end to end: rows, steps from ``timestep / 1000``, T5 words, word maps, true CFG.

CLIP (pooled vector) and T5 (the text sequence) are tiny random-weight
encoders; the pipeline is saved and loaded back. Expectations come from the
tokenizers' own ids and from ``probs`` hooks written with those slots.
"""

from __future__ import annotations

import pytest
import torch

import xattn
from tiny_flux import load_flux_pipeline, save_flux_pipeline
from xattn.adapters import TrueCFGError, adapter_for

PROMPT = "a red circle"
T5_LENGTH = 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_flux_pipeline(save_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", t5_length=T5_LENGTH))


def call(pipe, **options):
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=3.5, height=16, width=24,
                    max_sequence_length=T5_LENGTH, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **options).images


def circle_slots(pipe):
    ids = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=T5_LENGTH).input_ids
    return [ids.index(pipe.tokenizer_2.convert_tokens_to_ids("\u2581circle"))]


def test_rows_steps_grid_and_words(pipe):
    seen = []

    def hook(p, ctx):
        seen.append((ctx.step, ctx.num_steps, ctx.res, ctx.latent_hw, ctx.layout.rows, tuple(p.shape)))
        seen[-1] += (tuple(ctx.layout.token_map(0).indices("circle")),)

    with xattn.hooks(pipe, xattn.Hook("probs", hook, "kind=joint")):
        call(pipe)
    assert adapter_for(pipe).family == "flux"
    assert [(step, count) for step, count, *_ in seen] == [(s, 3) for s in range(3) for _ in range(2)]  # 2 sites
    # one conditional row (guidance-distilled: no unconditional rows); 16 x 24 image, no VAE scaling -> 8 x 12 tokens
    assert {entry[2:] for entry in seen} == {((8, 12), (16, 24), (xattn.Row(True, 0, 0),), (1, 2, 96, T5_LENGTH),
                                              tuple(circle_slots(pipe)))}


def test_reweight_and_word_maps_on_t5_slots(pipe):
    slots = circle_slots(pipe)

    def zero(p, ctx):
        p = p.clone()
        p[..., slots] = 0
        return p

    with xattn.hooks(pipe, xattn.Reweight({"circle": 0})):
        got = call(pipe)
    with xattn.hooks(pipe, xattn.Hook("probs", zero, "kind=joint")):
        expected = call(pipe)
    assert (got - expected).abs().max() <= 1e-5 and (got - call(pipe)).abs().max() > 1e-6
    seen = []
    capture = xattn.Capture()
    keep = xattn.Hook("probs", lambda p, ctx: seen.append(p[0][..., slots].double().sum(-1).mean(0)), "kind=joint")
    with xattn.hooks(pipe, capture, keep):
        call(pipe)
    maps = capture.maps()
    assert maps.image_size == (16, 24) and maps.resolutions == [(8, 12)] and maps.num_steps == 3
    expected_map = (sum(seen) / len(seen)).view(8, 12)
    assert (maps.word("circle", normalize=False, size=(8, 12)).double() - expected_map).abs().max() <= 1e-6
    assert maps.word("circle").shape == (16, 24)


def test_step_ends_follow_the_schedule(pipe):
    class Steps(xattn.Controller):
        selector = xattn.Selector.parse("kind=joint")

        def __init__(self):
            self.ended = []

        def probs(self, x, ctx):  # observes, so the run sees it at work
            return None

        def on_step_end(self, step, latents):
            self.ended.append(step)

    steps = Steps()
    with xattn.hooks(pipe, steps):
        call(pipe)
    assert steps.ended == [0, 1, 2]


TRUE_CFG = dict(negative_prompt="a blue square", true_cfg_scale=2.0)


def test_true_cfg_calls_are_told_apart_and_no_hooks_is_stock(pipe):
    stock = call(pipe, **TRUE_CFG)
    assert (stock - call(pipe)).abs().max() > 1e-4  # the negative prompt changes the result
    with xattn.hooks(pipe):
        assert (call(pipe, **TRUE_CFG) - stock).abs().max() <= 1e-5
    seen = []
    with xattn.hooks(pipe, xattn.Hook("probs", lambda p, ctx: seen.append((ctx.step, ctx.layout.rows, p.shape[0])),
                                      "sites=transformer_blocks.0.attn")):
        call(pipe, **TRUE_CFG)
    cond, uncond = (xattn.Row(True, 0, 0),), (xattn.Row(False, 0, 0),)
    assert seen == [(step, rows, 1) for step in range(3) for rows in (cond, uncond)]  # prompt first, then negative


def test_true_cfg_capture_keeps_the_prompts_maps_and_reweight_the_prompts_rows(pipe):
    slots = circle_slots(pipe)
    blocks = {True: [], False: []}

    def keep(p, ctx):
        blocks[ctx.layout.rows[0].cond].append(p[0][..., slots].double().sum(-1).mean(0))

    capture = xattn.Capture()
    with xattn.hooks(pipe, capture, xattn.Hook("probs", keep, "kind=joint")):
        call(pipe, **TRUE_CFG)
    assert len(blocks[True]) == len(blocks[False]) == 2 * 3
    maps = capture.maps()
    assert maps.resolutions == [(8, 12)] and maps.num_steps == 3
    expected = (sum(blocks[True]) / len(blocks[True])).view(8, 12)
    assert (maps.word("circle", normalize=False, size=(8, 12)).double() - expected).abs().max() <= 1e-6
    assert (expected - (sum(blocks[False]) / 6).view(8, 12)).abs().max() > 1e-6  # the negative's maps differ

    def zero(on_negative):
        def hook(p, ctx):
            if ctx.layout.rows[0].cond or on_negative:
                p = p.clone()
                p[..., slots] = 0
            return p
        return xattn.Hook("probs", hook, "kind=joint")

    with xattn.hooks(pipe, xattn.Reweight({"circle": 0})):
        got = call(pipe, **TRUE_CFG)
    with xattn.hooks(pipe, zero(on_negative=False)):
        expected_image = call(pipe, **TRUE_CFG)
    with xattn.hooks(pipe, zero(on_negative=True)):
        both = call(pipe, **TRUE_CFG)
    assert (got - expected_image).abs().max() <= 1e-5 and (got - both).abs().max() > 1e-6


@pytest.mark.parametrize("controller", [lambda: xattn.Replace(steps="0:2")], ids=["replace"])
def test_true_cfg_refuses_what_needs_both_rows_in_one_call_by_name(pipe, controller):
    made = controller()
    with xattn.hooks(pipe, made), pytest.raises(TrueCFGError, match=type(made).__name__):
        call(pipe, **TRUE_CFG)


def test_a_word_swap_shares_the_source_maps_inside_the_replace_window(pipe):
    seen = {}  # (site, step) -> the image->text block after the edit, [2, h, i, j]
    keep = xattn.Hook("probs", lambda p, ctx: seen.__setitem__((ctx.site.name, ctx.step), p.clone()), "kind=joint")
    with xattn.hooks(pipe, xattn.Replace(steps="0:2"), keep), torch.no_grad():
        pipe(["a red circle", "a blue circle"], num_inference_steps=3, height=16, width=24,
             max_sequence_length=T5_LENGTH, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2 * 3  # two joint sites, three steps
    for (site, step), block in seen.items():
        same = (block[1] - block[0]).abs().max().item()  # row 1: the target, row 0: the source
        assert same == 0 if step < 2 else same > 1e-6, (site, step)

"""Joint attention (SD3 / SD3.5, Flux.1): sites, parity with the stock processors, every point vs float64.

Tiny random-weight transformers are built, saved and loaded back; latents are
non-square (SD3 8 x 12 latent -> a 4 x 6 patch grid, Flux a 3 x 5 token grid).
Each site's inputs and output are recorded in the hooked run itself, and the
float64 reference (tests/joint_reference.py) recomputes that site from them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import attention_processor
from diffusers.models.transformers import transformer_flux

import xattn
from joint_reference import (flux_inputs, flux_model, max_difference, recording, reference, sd3_inputs, sd3_model,
                             sd3_pipeline)
from tiny_models import tokenizer
from xattn.adapters import adapter_for
from xattn.joint import JointProcessor
from xattn.selector import Selector

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("joint")
    return {"sd3": sd3_model(folder / "sd3"), "flux": flux_model(folder / "flux")}


FAMILIES = {  # family -> (inputs, patch grid, text first, image tokens at single-stream sites)
    "sd3": (sd3_inputs, (4, 6), False, None),
    "flux": (flux_inputs, (3, 5), True, 15),
}


def run(model, *controllers, **kwargs):
    with torch.no_grad(), xattn.hooks(model, *controllers, layout=xattn.BatchLayout.plain(2)):
        return model(**kwargs).sample


def stock(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


def check_sites(model, family, records, kinds=("joint",), **options):
    """Every recorded site's output equals the float64 reference of the same operation (at sites of ``kinds``)."""
    _, grid, text_first, single_tokens = FAMILIES[family]
    modules = dict(model.named_modules())
    sites = {site.name: site for site in xattn.sites(model)}
    for name, record in records.items():
        tokens = single_tokens if (sites[name].kind == "joint" and record["context"] is None) else None
        expected = reference(modules[name], record, family=family, text_first=text_first, image_tokens=tokens,
                             **(options if sites[name].kind in kinds else {}))
        assert max_difference(record["output"], expected["output"]) <= TOLERANCE, name


def test_sites_have_the_joint_kind(models):
    assert [(s.name, s.kind) for s in xattn.sites(models["sd3"])] == [
        ("transformer_blocks.0.attn", "joint"), ("transformer_blocks.0.attn2", "self"),
        ("transformer_blocks.1.attn", "joint")]
    assert [(s.name, s.kind) for s in xattn.sites(models["flux"])] == [
        ("transformer_blocks.0.attn", "joint"), ("single_transformer_blocks.0.attn", "joint")]
    joint = xattn.sites(models["sd3"])[0]
    assert Selector.parse("kind=cross").matches_site(joint) and Selector.parse("kind=joint").matches_site(joint)
    assert not Selector.parse("kind=self").matches_site(joint)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_no_hooks_fused_and_explicit_match_stock(models, family):
    model, make_inputs = models[family], FAMILIES[family][0]
    kwargs = make_inputs(seed=1)
    expected = stock(model, **kwargs)
    before = dict(model.attn_processors)
    with torch.no_grad(), xattn.hooks(model, layout=xattn.BatchLayout.plain(2)):
        wrapped = model.attn_processors
        assert all(isinstance(p, JointProcessor) and p.stock is before[k] for k, p in wrapped.items())
        assert (model(**kwargs).sample - expected).abs().max() <= TOLERANCE
    assert all(model.attn_processors[k] is p for k, p in before.items())
    fused = xattn.Hook("value_scale", lambda x, ctx: x * 1.0, selector="kind=all")  # xattn's SDPA core runs
    explicit = xattn.Hook("probs", lambda p, ctx: None, selector="kind=all")  # the map is built
    assert (run(model, fused, **kwargs) - expected).abs().max() <= TOLERANCE
    assert (run(model, explicit, **kwargs) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_scores_and_probs_equal_float64_blocks(models, family):
    model, (make_inputs, grid, text_first, single_tokens) = models[family], FAMILIES[family]
    kwargs = make_inputs(seed=2)
    seen = {}

    def keep(point):
        def hook(x, ctx):
            seen[(ctx.site.name, point)] = (x.clone(), ctx.res, ctx.kind)
        return hook

    names = [site.name for site in xattn.sites(model)]
    with recording(model, names) as records:
        run(model, xattn.Hook("scores", keep("scores"), "kind=all"), xattn.Hook("probs", keep("probs"), "kind=all"),
            **kwargs)
    modules = dict(model.named_modules())
    for name, record in records.items():
        kind = seen[(name, "probs")][2]
        tokens = single_tokens if (kind == "joint" and record["context"] is None) else None
        expected = reference(modules[name], record, family=family, text_first=text_first, image_tokens=tokens)
        for point in ("scores", "probs"):
            got, res, _ = seen[(name, point)]
            assert got.shape == expected[point].shape, (name, point)
            assert (got.double() - expected[point]).abs().max() <= TOLERANCE, (name, point)
        probs, res, _ = seen[(name, "probs")]
        assert res == grid and probs.shape[2] == grid[0] * grid[1], name  # rows: the patch grid
        if kind == "joint":  # [b, h, i_img, 7 text keys], a slice of the joint softmax: rows sum below 1
            assert probs.shape[3] == 7 and probs.sum(dim=-1).max() < 1, name


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("point", ["value_scale", "logit_bias"])
def test_fused_points_equal_float64_and_explicit(models, family, point):
    model, make_inputs = models[family], FAMILIES[family][0]
    kwargs = make_inputs(seed=3)
    weights = torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) * 2 + 0.1  # [b, j_text]
    if point == "value_scale":
        fused = xattn.Hook(point, lambda x, ctx: x * weights, "kind=joint")
        explicit = xattn.Hook("probs", lambda p, ctx: p * weights[:, None, None, :], "kind=joint")
        options = {"weights": weights}
    else:
        fused = xattn.Hook(point, lambda x, ctx: x + weights.log(), "kind=joint")
        explicit = xattn.Hook("scores", lambda s, ctx: s + weights.log()[:, None, None, :], "kind=joint")
        options = {"bias": weights.log()}
    joint_names = [site.name for site in xattn.sites(model) if site.kind == "joint"]
    with recording(model, joint_names) as records:
        got = run(model, fused, **kwargs)
    check_sites(model, family, records, **options)
    assert (got - run(model, explicit, **kwargs)).abs().max() <= TOLERANCE
    assert (got - stock(model, **kwargs)).abs().max() > 1e-3  # the weights did something


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_map_rows_and_context_equal_float64(models, family):
    model, make_inputs = models[family], FAMILIES[family][0]
    kwargs = make_inputs(seed=5)
    names = [site.name for site in xattn.sites(model)]

    def borrow(rows, ctx):
        rows[1] = 0
        return rows

    with recording(model, names) as records:
        run(model, xattn.Hook("map_rows", borrow, "kind=all"), **kwargs)
    check_sites(model, family, records, kinds=("joint", "self"), borrow=torch.tensor([0, 0]))
    with recording(model, names) as records:
        got = run(model, xattn.Hook("context", lambda c, ctx: c * 2.0, "kind=joint"), **kwargs)
    check_sites(model, family, records, context_scale=2.0)
    assert (got - stock(model, **kwargs)).abs().max() > 1e-3


def test_reweight_a_word_on_sd3_equals_float64(models):
    # A bare model call named by prompts=: the text is 77 CLIP slots, so words resolve with the CLIP tokenizer.
    model = models["sd3"]
    kwargs = sd3_inputs(seed=6, text=77)
    prompts = ["a red circle", "a circle and a square"]
    joint_names = [site.name for site in xattn.sites(model) if site.kind == "joint"]
    with recording(model, joint_names) as records, torch.no_grad(), \
            xattn.hooks(model, xattn.Reweight({"circle": 0}), prompts=prompts, tokenizer=tokenizer()):
        got = model(**kwargs).sample
    weights = torch.ones(2, 77)
    weights[0, 3] = weights[1, 2] = 0  # <start> a red circle / <start> a circle ...
    check_sites(model, "sd3", records, weights=weights)
    assert (got - stock(model, **kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_capture_keeps_maps_on_the_patch_grid(models, family):
    model, (make_inputs, grid, _, _) = models[family], FAMILIES[family]
    capture = xattn.Capture()  # kind=cross: the joint sites' image->text blocks
    run(model, capture, **make_inputs(seed=7))
    layers = capture.maps().layers
    assert layers and {layer.kind for layer in layers} == {"joint"}
    for layer in layers:
        assert layer.res == grid and tuple(layer.data.shape) == (2, 1, grid[0] * grid[1], 7)
    single = [s.name for s in xattn.sites(model) if s.name.startswith("single_")]
    assert all(capture.calls[(name, 0)] == 1 for name in single)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_processors_and_cores_restored_after_an_exception(models, family):
    model, make_inputs = models[family], FAMILIES[family][0]
    before = dict(model.attn_processors)

    def fail(p, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(model, xattn.Hook("probs", fail, "kind=joint"), **make_inputs(seed=8))
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert attention_processor.F is F
    assert transformer_flux.dispatch_attention_fn.__module__ == "diffusers.models.attention_dispatch"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gradients_through_fused_and_explicit_points_agree(models, family):
    model, make_inputs = models[family], FAMILIES[family][0]
    kwargs = make_inputs(seed=9)
    gradients = []
    for point in ("value_scale", "probs"):
        weights = torch.full((2, 7), 0.7, requires_grad=True)
        if point == "value_scale":
            scale = lambda x, ctx: x * weights  # noqa: E731
        else:
            scale = lambda p, ctx: p * weights[:, None, None, :]  # noqa: E731
        with xattn.hooks(model, xattn.Hook(point, scale, "kind=joint"), layout=xattn.BatchLayout.plain(2)):
            model(**kwargs).sample.square().sum().backward()
        gradients.append(weights.grad)
    assert gradients[0].abs().max() > 0 and (gradients[0] - gradients[1]).abs().max() <= 1e-4


def test_flux_with_fused_qkv_projections_is_hooked_the_same(models):
    # Flux keeps FluxAttnProcessor when its projections are fused: only the core is xattn's, so nothing changes.
    import copy

    plain, fused_model = models["flux"], copy.deepcopy(models["flux"])
    fused_model.fuse_qkv_projections()
    assert fused_model.transformer_blocks[0].attn.fused_projections
    kwargs = flux_inputs(seed=10)
    weights = torch.rand(2, 7, generator=torch.Generator().manual_seed(11)) + 0.5
    scale = xattn.Hook("value_scale", lambda x, ctx: x * weights, "kind=joint")
    expected = run(plain, scale, **kwargs)
    assert (run(fused_model, xattn.Hook("value_scale", lambda x, ctx: x * weights, "kind=joint"), **kwargs)
            - expected).abs().max() <= TOLERANCE
    assert (expected - stock(plain, **kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("boolean", [True, False])
def test_text_padding_mask_on_every_path(models, boolean):
    # A Flux double-stream attention called with a padding mask (row 0's last 2 of 7 text tokens are padding).
    model = models["flux"]
    attn = model.transformer_blocks[0].attn
    generator = torch.Generator().manual_seed(12)
    hidden, context = torch.randn(2, 15, 16, generator=generator), torch.randn(2, 7, 16, generator=generator)
    rope = model.pos_embed(torch.cat([flux_inputs(0)["txt_ids"], flux_inputs(0)["img_ids"]]))
    keep = torch.ones(2, 1, 1, 22, dtype=torch.bool)
    keep[0, ..., 5:7] = False  # [b, 1, 1, s]: text comes first in Flux's sequence
    mask = keep if boolean else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    weights = torch.rand(2, 7, generator=generator) + 0.5

    def call(*controllers):
        with torch.no_grad(), xattn.hooks(model, *controllers, layout=xattn.BatchLayout.plain(2)):
            return attn(hidden, encoder_hidden_states=context, attention_mask=mask, image_rotary_emb=rope)

    with torch.no_grad():
        expected = attn(hidden, encoder_hidden_states=context, attention_mask=mask, image_rotary_emb=rope)
    seen = {}
    observe = xattn.Hook("probs", lambda p, ctx: seen.__setitem__("probs", p.clone()), "kind=joint")
    for controllers in ((xattn.Hook("map_rows", lambda rows, ctx: rows, "kind=joint"),), (observe,)):
        assert max_difference(call(*controllers), expected) <= TOLERANCE
    assert seen["probs"][0, ..., 5:].abs().max() == 0 and seen["probs"][1, ..., 5:].abs().min() > 0
    fused = call(xattn.Hook("logit_bias", lambda x, ctx: x + weights.log(), "kind=joint"))
    explicit = call(xattn.Hook("scores", lambda x, ctx: x + weights.log()[:, None, None, :], "kind=joint"))
    assert max_difference(fused, explicit) <= TOLERANCE and max_difference(fused, expected) > 1e-3


def test_routing_is_scoped_to_the_thread():
    import threading

    from xattn.joint import FAMILIES as JOINT_FAMILIES, routed

    sd3 = next(family for family in JOINT_FAMILIES if family.name == "sd3")
    q = torch.randn(1, 2, 5, 4)
    expected = F.scaled_dot_product_attention(q, q, q)
    other = {}
    with routed(sd3, lambda *args, **kwargs: torch.zeros_like(q)):
        assert attention_processor.F.scaled_dot_product_attention(q, q, q).abs().max() == 0  # this thread: routed
        sdpa = attention_processor.F.scaled_dot_product_attention
        thread = threading.Thread(target=lambda: other.update(out=sdpa(q, q, q)))
        thread.start()
        thread.join()
    assert torch.equal(other["out"], expected)  # another thread: the real SDPA
    assert attention_processor.F is F


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    return sd3_pipeline(tmp_path_factory.mktemp("sd3_pipeline") / "pipe")


def sd3_call(pipe):
    with torch.no_grad():
        return pipe(["a red circle"], negative_prompt="blurry", num_inference_steps=2, guidance_scale=3.0, height=16,
                    width=24, max_sequence_length=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_sd3_pipeline_rows_steps_and_grid(sd3_pipe):
    seen = []
    hook = xattn.Hook("probs", lambda p, ctx: seen.append((ctx.step, ctx.num_steps, ctx.res, ctx.layout.rows,
                                                           tuple(p.shape))), "kind=joint")
    with xattn.hooks(sd3_pipe, hook):
        sd3_call(sd3_pipe)
    assert adapter_for(sd3_pipe).family == "sd3"
    assert len(seen) == 2 * 2  # two joint sites, two steps
    assert {(step, count) for step, count, *_ in seen} == {(0, 2), (1, 2)}
    # classifier-free guidance: the negative row first, then the prompt; 16 x 24 latent -> 8 x 12 patches;
    # text = CLIP's 77 slots then T5's 16 (zeros without a T5 encoder)
    assert {(res, rows, shape) for _, _, res, rows, shape in seen} == {
        ((8, 12), (xattn.Row(False, 0, 0), xattn.Row(True, 0, 0)), (2, 2, 96, 93))}


def test_sd3_pipeline_reweight_equals_zeroing_the_word_explicitly(sd3_pipe):
    with xattn.hooks(sd3_pipe, xattn.Reweight({"circle": 0})):
        got = sd3_call(sd3_pipe)

    def zero_circle(p, ctx):  # <start> a red circle: slot 3, conditional rows only
        p = p.clone()
        p[ctx.layout.row_indices(cond=True), :, :, 3] = 0
        return p

    with xattn.hooks(sd3_pipe, xattn.Hook("probs", zero_circle, "kind=joint")):
        expected = sd3_call(sd3_pipe)
    assert (got - expected).abs().max() <= TOLERANCE
    assert (got - sd3_call(sd3_pipe)).abs().max() > 1e-4

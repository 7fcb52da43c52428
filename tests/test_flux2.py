"""Flux.2's transformer at the model level: its dual-stream and its single-stream (fused QKV + MLP) blocks.

The reference is the stock model itself: with no xattn installed, each
attention module's queries and keys are recorded at its own
``dispatch_attention_fn`` call, and the joint softmax is written out from
them in float64. xattn must give the stock output with no hooks, the
reference's image->text block at ``probs``, and, for a fused reweight, the
output of the explicit map with the same weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import xattn

TEXT, GRID = 5, (3, 4)  # text tokens; the packed token grid (rows, columns)
DUAL, SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def model():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2)).eval()


def inputs(batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(3)
    rows, columns = GRID
    t, h, w, layer = torch.meshgrid(torch.arange(1), torch.arange(rows), torch.arange(columns), torch.arange(1),
                                    indexing="ij")
    img_ids = torch.stack([t, h, w, layer], dim=-1).view(-1, 4)  # (T, H, W, L) per token, as Flux2Pipeline makes
    txt_ids = torch.stack([torch.zeros(TEXT), torch.zeros(TEXT), torch.zeros(TEXT), torch.arange(TEXT)], -1)
    return dict(hidden_states=torch.randn(batch, rows * columns, 8, generator=generator),
                encoder_hidden_states=torch.randn(batch, TEXT, 12, generator=generator),
                timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
                img_ids=img_ids.long(), txt_ids=txt_ids.long())


@contextmanager
def recorded_cores():
    """Each stock ``dispatch_attention_fn`` call's query and key ([b, s, h, d]), in call order."""
    from diffusers.models.transformers import transformer_flux2 as flux2

    original, calls = flux2.dispatch_attention_fn, []

    def record(query, key, value, *args, **kwargs):
        calls.append((query.detach().clone(), key.detach().clone()))
        return original(query, key, value, *args, **kwargs)

    flux2.dispatch_attention_fn = record
    try:
        yield calls
    finally:
        flux2.dispatch_attention_fn = original


def reference_blocks(model) -> list[torch.Tensor]:
    """The image->text block of each site's joint softmax, float64, from the stock model's own q and k."""
    with recorded_cores() as calls, torch.no_grad():
        model(**inputs())
    blocks = []
    for query, key in calls:
        q, k = query.double().transpose(1, 2), key.double().transpose(1, 2)  # [b, h, s, d]; text first
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        blocks.append(probs[:, :, TEXT:, :TEXT])  # image queries x text keys
    return blocks


def test_sites_are_joint_and_no_hooks_is_the_stock_output(model):
    assert [(s.name, s.kind) for s in xattn.sites(model)] == [(DUAL, "joint"), (SINGLE, "joint")]
    with torch.no_grad():
        expected = model(**inputs()).sample
        with xattn.hooks(model):
            inside = [type(p).__name__ for p in model.attn_processors.values()]
            same = model(**inputs()).sample
    assert inside == ["JointProcessor", "JointProcessor"]
    assert (same - expected).abs().max() == 0
    assert [type(p).__name__ for p in model.attn_processors.values()] == [
        "Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"]


def test_probs_at_both_blocks_equal_the_float64_reference(model):
    seen = {}
    keep = xattn.Hook("probs", lambda p, ctx: seen.__setitem__(ctx.site.name, (p.clone(), ctx.res)), "kind=joint")
    with torch.no_grad():
        expected = model(**inputs()).sample
        with xattn.hooks(model, keep, layout=xattn.BatchLayout.plain(2)):
            got = model(**inputs()).sample
    assert (got - expected).abs().max() <= 1e-5
    for name, reference in zip((DUAL, SINGLE), reference_blocks(model)):
        probs, res = seen[name]
        assert res == GRID and probs.shape == (2, 2, GRID[0] * GRID[1], TEXT)
        assert (probs.double() - reference).abs().max() <= 1e-6, name


def test_fused_reweight_equals_the_explicit_map_with_the_same_weights(model):
    weights = {1: 0.0, 3: 2.5}

    def scaled(probs, ctx):  # the same operation written on the map: column j times its weight
        factor = torch.ones(probs.shape[-1])
        for slot, weight in weights.items():
            factor[slot] = weight
        return probs * factor

    with torch.no_grad():
        with xattn.hooks(model, xattn.Reweight(weights, mode="scale"), layout=xattn.BatchLayout.plain(2)):
            fused = model(**inputs()).sample
        with xattn.hooks(model, xattn.Hook("probs", scaled, "kind=joint"), layout=xattn.BatchLayout.plain(2)):
            explicit = model(**inputs()).sample
        plain = model(**inputs()).sample
    assert (fused - explicit).abs().max() <= 1e-5
    assert (fused - plain).abs().max() > 1e-4  # the weights change the output


def test_processors_are_restored_after_an_exception(model):
    before = dict(model.attn_processors)

    def fail(probs, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with xattn.hooks(model, xattn.Hook("probs", fail, "kind=joint")):
            model(**inputs())
    assert all(model.attn_processors[name] is processor for name, processor in before.items())

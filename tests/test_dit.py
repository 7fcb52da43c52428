"""A diffusion transformer with cross-attention (PixArt-style): the processor is exact there too.

Only the denoiser is exercised here, with random text states (the whole
PixArtSigmaPipeline, with a tiny offline T5, is in test_pixart_pipeline.py). The checks are those of
tests/test_processor.py: stock parity, the explicit path, float64 maps, the
text padding mask, and fused map injection.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

import xattn
from reference import copy_row_zero_map, reference_probs, row_one_borrows_row_zero

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()


def inputs(seed: int = 0, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 7)
    mask[0, 5:] = 0  # row 0's prompt is two tokens shorter: padding the attention must ignore
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=generator),
                encoder_attention_mask=mask, timestep=torch.tensor([500] * batch),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def run(model, *controllers, **kwargs) -> torch.Tensor:
    with torch.no_grad(), xattn.hooks(model, *controllers, layout=xattn.BatchLayout.plain(2)):
        return model(**kwargs).sample


def stock(model, **kwargs) -> torch.Tensor:
    original = model.attn_processors
    model.set_attn_processor(AttnProcessor2_0())
    try:
        with torch.no_grad():
            return model(**kwargs).sample
    finally:
        model.set_attn_processor(original)


def test_sites_are_found_with_their_token_grid(dit):
    sites = xattn.sites(dit)
    assert [(s.name, s.kind) for s in sites] == [
        ("transformer_blocks.0.attn1", "self"), ("transformer_blocks.0.attn2", "cross"),
        ("transformer_blocks.1.attn1", "self"), ("transformer_blocks.1.attn2", "cross")]
    res = set()
    run(dit, xattn.Hook("probs", lambda p, ctx: res.add(ctx.res), selector="kind=all"), **inputs())
    assert res == {(4, 4)}  # 8 x 8 latents in 2 x 2 patches


def test_no_hooks_and_explicit_path_match_stock(dit):
    kwargs = inputs(seed=1)
    expected = stock(dit, **kwargs)
    assert (run(dit, **kwargs) - expected).abs().max() <= TOLERANCE
    observe = xattn.Hook("probs", lambda p, ctx: None, selector="kind=all")
    assert (run(dit, observe, **kwargs) - expected).abs().max() <= TOLERANCE


def test_cross_maps_equal_float64_reference_and_ignore_padding(dit):
    kwargs = inputs(seed=2)
    modules = dict(dit.named_modules())
    seen, handles = {}, []
    for site in xattn.sites(dit):
        if site.kind == "cross":
            def remember(module, args, kw, name=site.name):
                seen[name] = {"hidden": args[0] if args else kw["hidden_states"],
                              "context": kw["encoder_hidden_states"]}
            handles.append(modules[site.name].register_forward_pre_hook(remember, with_kwargs=True))
    keep = xattn.Hook("probs", lambda p, ctx: seen[ctx.site.name].__setitem__("probs", p.clone()), selector="kind=cross")
    try:
        run(dit, keep, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, record in seen.items():
        probs = record["probs"].double()  # [b, h, i, 7]
        assert probs[0, ..., 5:].abs().max() == 0  # the padded tokens of row 0 get no attention
        reference = reference_probs(modules[name], record["hidden"][1:], record["context"][1:])  # row 1: no padding
        assert (probs[1:] - reference).abs().max() <= TOLERANCE, name
        short = reference_probs(modules[name], record["hidden"][:1], record["context"][:1, :5])  # row 0, 5 tokens
        assert (probs[:1, ..., :5] - short).abs().max() <= TOLERANCE, name


def test_map_injection_equals_copying_the_map(dit):
    kwargs = inputs(seed=3)

    fused = run(dit, xattn.Hook("map_rows", row_one_borrows_row_zero, selector="kind=self"), **kwargs)
    copied = run(dit, xattn.Hook("probs", copy_row_zero_map, selector="kind=self"), **kwargs)
    assert (fused - copied).abs().max() <= TOLERANCE
    assert (fused[1] - stock(dit, **kwargs)[1]).abs().max() > 1e-3

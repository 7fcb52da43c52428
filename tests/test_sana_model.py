"""Sana's transformer: cross sites hooked exactly through its own processor; linear self-attention untouched.

References: the stock model (no session), and Sana's cross-attention written
out again in float64 from the module's weights (projections, QK RMS norms
across heads, the text padding mask, the output projection), with each hook
point's change applied by hand.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaTransformer2DModel

import xattn
from xattn.install import hookable
from xattn.sites import format_table, not_sites

TOLERANCE = 1e-5
TEXT = 12


@pytest.fixture(scope="module", params=[None, "rms_norm_across_heads"])
def sana(request):
    torch.manual_seed(0)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT,
        sample_size=8, patch_size=1, qk_norm=request.param).eval()


def inputs(seed: int = 0, grid=(6, 8)) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0  # row 0's text is two tokens shorter: padding
    return dict(hidden_states=torch.randn(2, 4, *grid, generator=generator),
                encoder_hidden_states=torch.randn(2, 7, TEXT, generator=generator), encoder_attention_mask=mask,
                timestep=torch.tensor([500.0, 500.0]))


def run(model, *controllers, **kwargs) -> torch.Tensor:
    with torch.no_grad(), xattn.hooks(model, *controllers, layout=xattn.BatchLayout.plain(2)):
        return model(**kwargs).sample


def test_cross_sites_only_and_linear_attention_said_so(sana):
    assert [(s.name, s.kind) for s in xattn.sites(sana)] == [
        ("transformer_blocks.0.attn2", "cross"), ("transformer_blocks.1.attn2", "cross")]
    assert set(not_sites(sana)) == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    table = format_table(xattn.sites(sana), hookable(sana))
    assert "not sites (2 modules" in table and "linear attention" in table
    before = {name: p for name, p in sana.attn_processors.items()}
    with xattn.hooks(sana, layout=xattn.BatchLayout.plain(2)):  # every site: the linear ones stay stock
        inside = sana.attn_processors
        assert all(inside[name] is p for name, p in before.items() if ".attn1." in name)
        assert all(inside[name] is not p for name, p in before.items() if ".attn2." in name)
    assert all(sana.attn_processors[name] is p for name, p in before.items())
    with pytest.raises(xattn.NothingSelectedError):
        xattn.hooks(sana, xattn.Hook("probs", lambda p, ctx: None, "kind=self")).__enter__()


def test_no_hooks_and_explicit_equal_stock_and_maps_have_the_grid(sana):
    kwargs = inputs(1)
    with torch.no_grad():
        stock = sana(**kwargs).sample
    assert (run(sana, **kwargs) - stock).abs().max() <= TOLERANCE
    res = []
    observe = xattn.Hook("probs", lambda p, ctx: res.append(ctx.res), "kind=cross")
    assert (run(sana, observe, **kwargs) - stock).abs().max() <= TOLERANCE
    assert set(res) == {(6, 8)} and len(res) == 2


def _linear(layer, x):
    return torch.nn.functional.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())


def _norm(norm, x):  # RMSNorm over the whole projection (all heads), or nothing
    if norm is None:
        return x
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return x if norm.weight is None else x * norm.weight.double()


def reference(attn, x, text, mask, *, context=None, rows=None, bias=None, weights=None, scores=None, probs=None):
    """Sana's cross-attention in float64, each point's change written out: (output [b, i, c], probs [b, h, i, j])."""
    x, text = x.double(), text.double()
    if context is not None:
        text = context(text)
    q, k, v = _norm(attn.norm_q, _linear(attn.to_q, x)), _norm(attn.norm_k, _linear(attn.to_k, text)), \
        _linear(attn.to_v, text)
    heads = attn.heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # [b, h, n, d]

    q, k, v = split(q), split(k), split(v)
    if rows is not None:
        q, k, mask = q[rows], k[rows], mask[rows]
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + ((1 - mask.double()) * -10000.0)[:, None, None, :]
    if bias is not None:
        logits = logits + bias.double()[:, None, None, :]
    if scores is not None:
        logits = scores(logits)
    p = logits.softmax(-1)
    if weights is not None:
        p = p * weights.double()[:, None, None, :]
    if probs is not None:
        p = probs(p)
    out = (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return _linear(attn.to_out[0], out), p


def one_site(sana, hook_point, fn, kwargs):
    """The first cross site called on its own inside a session with one hook: (output, probs seen there)."""
    attn = sana.transformer_blocks[0].attn2
    seen = []
    hooks = [xattn.Hook(hook_point, fn, "sites=transformer_blocks.0.attn2")]
    if hook_point != "probs":
        hooks.append(xattn.Hook("probs", lambda p, ctx: seen.append(p.detach().clone()),
                                "sites=transformer_blocks.0.attn2"))
    with torch.no_grad(), xattn.hooks(sana, *hooks, layout=xattn.BatchLayout.plain(2)):
        out = attn(kwargs["x"], encoder_hidden_states=kwargs["text"], attention_mask=kwargs["mask"])
    return out, seen


BIAS = torch.tensor([[0.0, 1.5, -0.5, 0.0, 0.2, 0.0, 0.0], [0.3, 0.0, 0.0, -1.0, 0.0, 0.7, 0.1]])
WEIGHTS = torch.tensor([[1.0, 0.0, 2.0, 1.0, 0.5, 1.0, 1.0], [0.5, 1.0, 1.0, 3.0, 1.0, 1.0, 0.0]])


def _scores(s):
    return s + torch.linspace(-1, 1, s.shape[-1], dtype=s.dtype)


def _probs(p):
    p = p.clone()
    p[..., 2] = 0
    return p * 1.5


POINTS = {  # point -> (hook, the same change for the float64 reference)
    "context": (lambda c, ctx: c * 0.5, dict(context=lambda t: t * 0.5)),
    "map_rows": (lambda r, ctx: torch.tensor([1, 1]), dict(rows=torch.tensor([1, 1]))),
    "logit_bias": (lambda b, ctx: b + BIAS, dict(bias=BIAS)),
    "value_scale": (lambda w, ctx: w * WEIGHTS, dict(weights=WEIGHTS)),
    "scores": (lambda s, ctx: _scores(s), dict(scores=_scores)),
    "probs": (lambda p, ctx: _probs(p), dict(probs=_probs)),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_every_point_equals_float64(sana, point):
    generator = torch.Generator().manual_seed(7)
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    kwargs = dict(x=torch.randn(2, 12, 16, generator=generator), text=torch.randn(2, 7, 16, generator=generator),
                  mask=(1 - mask) * -10000.0)  # as Sana's transformer hands it to its blocks
    hook, change = POINTS[point]
    out, seen = one_site(sana, point, hook, kwargs)
    expected, expected_probs = reference(sana.transformer_blocks[0].attn2, kwargs["x"], kwargs["text"], mask,
                                         **change)
    assert (out.double() - expected).abs().max() <= TOLERANCE, point
    if seen:  # the map a later probs hook saw: the changed one
        assert (seen[0].double() - expected_probs).abs().max() <= TOLERANCE, point


@pytest.mark.parametrize("point", ["logit_bias", "value_scale", "map_rows", "context"])
def test_fused_points_equal_the_explicit_path(sana, point):
    kwargs = inputs(3)
    hook, _ = POINTS[point]
    fused = run(sana, xattn.Hook(point, hook, "kind=cross"), **kwargs)
    explicit = run(sana, xattn.Hook(point, hook, "kind=cross"), xattn.Hook("probs", lambda p, ctx: None), **kwargs)
    with torch.no_grad():
        stock = sana(**kwargs).sample
    assert (fused - explicit).abs().max() <= TOLERANCE and (fused - stock).abs().max() > 1e-4


def test_processors_restored_after_an_exception(sana):
    before = sana.attn_processors

    def fail(p, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(sana, xattn.Hook("probs", fail), **inputs())
    assert all(sana.attn_processors[name] is p for name, p in before.items())


def test_one_map_size_tells_transformers_from_unets(sana):
    from tiny_models import sd1_unet
    from xattn.sites import one_map_size

    assert one_map_size(sana) and not one_map_size(sd1_unet())

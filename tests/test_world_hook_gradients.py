"""Gradients flow through xattn's hook points, as the shapes world's training needs.

The world's grounding loss is computed on cross-attention probabilities kept
during the UNet call (``xattn.world.grounding``). A ``probs`` hook that keeps
the map it is given sees the same tensor inside the autograd graph: a loss on
those maps (plus the UNet's output) has the same gradients with respect to the
latents and the text as the same loss written out in plain float64 attention.
"""

from __future__ import annotations

import pytest
import torch

import xattn
from tiny_models import TEXT_DIM, sd1_unet
from reference import ProbeProcessor
from xattn.world.grounding import ProbeStore, grounding_loss

torch.set_num_threads(1)
PROCESSOR = ".processor"


class ReferenceAttention:
    """Plain float64 attention of a diffusers ``Attention`` module that keeps its probabilities, by site name."""

    def __init__(self, name: str, kept: dict[str, torch.Tensor]):
        self.name, self.kept = name, kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, i, _ = hidden_states.shape  # [b, i, c]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, i, h, -1).transpose(1, 2)  # [b, h, i, d]
        k = attn.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)  # [b, h, j, d]
        v = attn.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)  # [b, h, j, d]
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [b, h, i, j]
        if encoder_hidden_states is not None:
            self.kept[self.name] = probs
        out = (probs @ v).transpose(1, 2).reshape(b, i, -1)  # [b, i, h*d]
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def weights_for(probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fixed random weights per site, the same for both runs (drawn in site-name order)."""
    gen = torch.Generator().manual_seed(7)
    return {name: torch.rand(p.shape, generator=gen, dtype=torch.float64) for name, p in sorted(probs.items())}


def loss_of(output: torch.Tensor, probs: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    out_weight = torch.randn(output.shape, generator=gen, dtype=torch.float64)
    return (output * out_weight).sum() + sum((probs[name] * w).sum() for name, w in weights.items())


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return sd1_unet().double().eval()


def inputs():
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=gen, dtype=torch.float64).requires_grad_(True)
    text = torch.randn(2, 77, TEXT_DIM, generator=gen, dtype=torch.float64).requires_grad_(True)
    return latents, text, torch.tensor([500, 300])


def test_gradients_through_probs_hooks_equal_plain_float64_autograd(unet):
    # xattn: a probs hook at every cross site keeps the map it is given.
    kept: dict[str, torch.Tensor] = {}

    def keep(probs, ctx):  # probs: [b, h, i, j]
        kept[ctx.site.name] = probs

    latents, text, t = inputs()
    with xattn.hooks(unet, xattn.Hook("probs", keep, selector="kind=cross")):
        output = unet(latents, t, text).sample
    assert kept and all(p.requires_grad for p in kept.values())
    weights = weights_for(kept)
    grad_latents, grad_text = torch.autograd.grad(loss_of(output, kept, weights), (latents, text), retain_graph=True)

    # Reference: the same UNet with plain float64 attention everywhere, no xattn.
    saved = unet.attn_processors
    ref_kept: dict[str, torch.Tensor] = {}
    unet.set_attn_processor({key: ReferenceAttention(key.removesuffix(PROCESSOR), ref_kept) for key in saved})
    try:
        latents_ref, text_ref, t = inputs()
        output_ref = unet(latents_ref, t, text_ref).sample
        assert set(ref_kept) == set(kept)
        ref_latents, ref_text = torch.autograd.grad(loss_of(output_ref, ref_kept, weights), (latents_ref, text_ref))
    finally:
        unet.set_attn_processor(saved)
    assert torch.allclose(output, output_ref, rtol=1e-10, atol=1e-12)
    assert grad_latents.abs().max() > 0 and grad_text.abs().max() > 0
    assert torch.allclose(grad_latents, ref_latents, rtol=1e-9, atol=1e-12)
    assert torch.allclose(grad_text, ref_text, rtol=1e-9, atol=1e-12)
    # The kept maps are in the graph: without their term the latents' gradient is another one.
    output_only, = torch.autograd.grad(loss_of(output, kept, {}), (latents,))
    assert not torch.allclose(output_only, grad_latents, rtol=1e-6)


def test_the_grounding_loss_through_a_hook_equals_the_training_probe(unet):
    """Training reads its maps through a hook; the former explicit probe gives the same loss and gradients."""
    gen = torch.Generator().manual_seed(5)

    def targets_for(store: list[torch.Tensor]):
        sizes = sorted({p.shape[2] for p in store})
        targets = {n: (torch.rand(2, 77, n, generator=gen, dtype=torch.float64) > 0.7).double() for n in sizes}
        valid = torch.zeros(2, 77, dtype=torch.float64)
        valid[:, 2:4] = 1
        return targets, valid

    latents, text, t = inputs()
    hooked: list[torch.Tensor] = []
    with xattn.hooks(unet, xattn.Hook("probs", lambda probs, ctx: hooked.append(probs), selector="kind=cross")):
        unet(latents, t, text)
    targets, valid = targets_for(hooked)
    share, bce = grounding_loss(hooked, targets, valid)
    grads = torch.autograd.grad(share + bce, (latents, text))

    saved = unet.attn_processors
    store = ProbeStore()
    unet.set_attn_processor({key: ProbeProcessor(store) if ".attn2." in key else proc for key, proc in saved.items()})
    try:
        latents_ref, text_ref, t = inputs()
        unet(latents_ref, t, text_ref)
        ref_share, ref_bce = grounding_loss(store.probs, targets, valid)
        ref_grads = torch.autograd.grad(ref_share + ref_bce, (latents_ref, text_ref))
    finally:
        unet.set_attn_processor(saved)
    assert [p.shape for p in hooked] == [p.shape for p in store.probs]  # same sites, same call order
    assert torch.allclose(share, ref_share, rtol=1e-10) and torch.allclose(bce, ref_bce, rtol=1e-10)
    for mine, ref in zip(grads, ref_grads):
        assert mine.abs().max() > 0
        assert torch.allclose(mine, ref, rtol=1e-9, atol=1e-12)

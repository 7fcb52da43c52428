"""Training-time cross-attention supervision (TokenCompose-style grounding).

Why: plain diffusion training of a tiny causal text encoder smears every word
over the end/padding tokens, so all word maps look alike.  Pushing each
colour/shape token's attention inside its object's mask makes the maps mean
something.  This is *supervised* attention: the shapes-world maps are not
evidence about how Stable Diffusion itself attends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ProbeStore:
    """Collects differentiable cross-attention probabilities per forward pass."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []  # each [b, heads, pixels, tokens]
        self.enabled = True

    def clear(self) -> None:
        self.probs = []


class ProbeProcessor:
    """Cross-attention with an explicit softmax(QK^T * scale) kept for the loss.

    Numerically the same computation as diffusers' AttnProcessor for a plain
    cross-attention layer (no masks, norms or residual inside the module).
    """

    def __init__(self, store: ProbeStore) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs):
        b, n, _ = hidden_states.shape  # [b, pixels, channels]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        h = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        q = q.view(b, n, h, -1).transpose(1, 2)  # [b, h, i, d]
        k = k.view(b, k.shape[1], h, -1).transpose(1, 2)  # [b, h, j, d]
        v = v.view(b, v.shape[1], h, -1).transpose(1, 2)  # [b, h, j, d]
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # [b, h, i, j]
        if self.store.enabled:
            self.store.probs.append(probs)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)  # [b, i, h*d]
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install(unet) -> ProbeStore:
    """Put ProbeProcessor on every cross-attention (attn2) module of ``unet``."""
    store = ProbeStore()
    procs = {}
    for name, proc in unet.attn_processors.items():
        procs[name] = ProbeProcessor(store) if ".attn2." in name else proc
    unet.set_attn_processor(procs)
    return store


def grounding_loss(probs_list: list[torch.Tensor], targets: dict[int, torch.Tensor],
                   valid: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Share and pixel-BCE terms averaged over supervised layers.

    probs_list: [b, h, i, j] per layer.  targets[i]: [b, j, i] soft masks at
    the layer's pixel count i (zero rows for tokens without an object).
    valid: [b, j] 1 where token j names an object.
    share: (1 - attention mass inside the mask / total mass)^2 per token.
    bce: per-pixel BCE of the token's probability against the mask.
    """
    shares, bces = [], []
    denom = valid.sum().clamp(min=1.0)
    for probs in probs_list:
        n = probs.shape[2]
        if n not in targets:
            continue
        a = probs.mean(dim=1).transpose(1, 2)  # [b, j, i]
        g = targets[n]  # [b, j, i]
        inside = (a * g).sum(-1) / (a.sum(-1) + eps)  # [b, j]
        shares.append((((1 - inside) ** 2) * valid).sum() / denom)
        bce = F.binary_cross_entropy(a.clamp(eps, 1 - eps), g, reduction="none").mean(-1)  # [b, j]
        bces.append((bce * valid).sum() / denom)
    if not shares:
        zero = probs_list[0].new_zeros(())
        return zero, zero
    return torch.stack(shares).mean(), torch.stack(bces).mean()

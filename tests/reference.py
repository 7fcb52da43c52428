"""Independent references for tests: attention written out in float64 from a module's weights."""

from __future__ import annotations

import torch


def reference_probs(attn, hidden_states: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) in float64 for a diffusers ``Attention`` module: [b, h, i, j].

    Args:
        attn: the module whose weights are used (to_q, to_k, group_norm).
        hidden_states: its query input, [b, i, c] or [b, c, h, w].
        context: its encoder_hidden_states (None for self-attention).
    """
    x = hidden_states.double()
    if x.ndim == 4:
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).transpose(1, 2)  # [b, i, c]
    if attn.group_norm is not None:
        x = attn.group_norm.double()(x.transpose(1, 2)).transpose(1, 2)
    keys_from = x if context is None else context.double()

    def linear(layer, inputs):
        bias = None if layer.bias is None else layer.bias.double()
        return torch.nn.functional.linear(inputs, layer.weight.double(), bias)

    q, k = linear(attn.to_q, x), linear(attn.to_k, keys_from)
    d = q.shape[-1] // attn.heads
    q = q.view(q.shape[0], -1, attn.heads, d).transpose(1, 2)  # [b, h, i, d]
    k = k.view(k.shape[0], -1, attn.heads, d).transpose(1, 2)  # [b, h, j, d]
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)


def row_one_borrows_row_zero(rows: torch.Tensor, ctx) -> torch.Tensor:
    """A ``map_rows`` hook: row 1 attends with row 0's map (fused injection)."""
    rows[1] = 0
    return rows


def copy_row_zero_map(probs: torch.Tensor, ctx) -> torch.Tensor:
    """The explicit reference of :func:`row_one_borrows_row_zero`: a ``probs`` hook copying row 0's map into row 1."""
    probs = probs.clone()
    probs[1] = probs[0]
    return probs


# -- the shapes world's former training probe: an independent explicit cross-attention -----------------------

class ProbeProcessor:
    """Cross-attention with an explicit softmax(QK^T * scale) kept for the loss.

    Numerically the same computation as diffusers' AttnProcessor for a plain
    cross-attention layer (no masks, norms or residual inside the module).
    """

    def __init__(self, store) -> None:
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


def install_probe(unet):
    """Put ProbeProcessor on every cross-attention (attn2) module of ``unet``; the store it fills."""
    from xattn.world.grounding import ProbeStore

    store = ProbeStore()
    unet.set_attn_processor({name: ProbeProcessor(store) if ".attn2." in name else proc
                             for name, proc in unet.attn_processors.items()})
    return store


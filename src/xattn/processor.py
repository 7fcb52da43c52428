"""The xattn attention processor: diffusers' SDPA attention with hook points.

It computes exactly what diffusers' ``AttnProcessor2_0`` computes for the
``Attention`` modules of SD 1.x / 2.x / SDXL UNets (spatial and group norm,
norm_cross, attention masks, residual connection, output rescaling, upcast
flags), and lets hooks see or change the attention on the way. Three paths:

- fused: ``F.scaled_dot_product_attention``, when no hook at this site and
  step needs the map. ``logit_bias`` hooks become SDPA's float mask
  (softmax(s + b) = multiply by exp(b) and renormalise), ``value_scale``
  hooks scale the rows of V (P·diag(c)·V = P·(diag(c)·V)), and ``map_rows``
  hooks hand a row another row's queries and keys (so it attends with that
  row's map, over its own values); all exact, none materialises the
  [b, h, i, j] map.
- explicit: scores -> ``scores`` hooks -> softmax -> ``probs`` hooks -> @ V,
  only where a ``scores`` or ``probs`` hook runs this call.
- untouched: sites outside every selector keep their original processor.

At an IP-Adapter site the text comes as ``(text, image tokens)``: the points
see the text attention only, and :mod:`xattn.ip_adapter`'s subclass adds the
image branch (:meth:`XattnProcessor.add_image_branch`) after it.

Dimensions: b batch rows, h heads, i queries, j keys, d head dim, c channels.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .errors import UnsupportedProcessorError
from .sites import Site


class XattnProcessor:
    """Attention processor for one site; asks the session's runtime which hooks run."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _remember_signature(cls)

    def __init__(self, site: Site, runtime):
        self.site = site
        self.runtime = runtime

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **unknown,
    ) -> torch.Tensor:
        if unknown:  # diffusers filters most extras before us; what still arrives must not be dropped
            raise UnsupportedProcessorError(f"xattn's processor at {self.site.name} takes no {sorted(unknown)}; "
                                            "close the xattn session to use them")
        ip_states = None  # an IP-Adapter's image tokens ride with the text as (text, [per adapter])
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_states = self.split_image_tokens(encoder_hidden_states)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channels, height * width).transpose(1, 2)  # [b, i, c]

        batch_size, query_length, _ = hidden_states.shape
        key_length = query_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        active = self.runtime.active_hooks(self.site, query_length)  # None on the common, hook-free path

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])  # [b, h, 1|i, j]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # [b, i, h*d]

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        else:
            if active is not None:
                encoder_hidden_states = active.run("context", encoder_hidden_states)  # [b, j, d_ctx]
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)  # [b, j, h*d]
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, i, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, j, d]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, j, d]

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        own_query = query  # the image branch (IP-Adapter) always attends with the row's own queries
        if active is not None and active.has("map_rows"):
            query, key, attention_mask = _borrow_maps(active, query, key, attention_mask)

        token_scale = None  # [b, j] post-softmax multiplier
        if active is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
        else:
            attention_mask = _add_logit_bias(active, attention_mask, query, key_length)
            if active.has("value_scale"):
                ones = torch.ones(batch_size, key_length, dtype=query.dtype, device=query.device)
                token_scale = active.run("value_scale", ones)
            if active.explicit:
                hidden_states = _explicit_attention(attn, query, key, value, attention_mask, token_scale, active)
            else:
                if token_scale is not None:
                    value = value * token_scale[:, None, :, None]  # scale V's rows: [b, 1, j, 1]
                hidden_states = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
                )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # [b, i, h*d]
        hidden_states = hidden_states.to(query.dtype)
        if ip_states is not None:
            hidden_states = self.add_image_branch(attn, own_query, hidden_states, ip_states, active)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def split_image_tokens(self, states: tuple) -> tuple[torch.Tensor, list]:
        """``(text, image tokens)`` from an IP-Adapter's UNet; only :mod:`xattn.ip_adapter`'s processor takes them."""
        raise UnsupportedProcessorError(
            f"site {self.site.name} receives IP-Adapter image tokens, but no IP-Adapter processor was there when "
            "xattn was installed (diffusers' AttnProcessor2_0 cannot take them either); load the adapter with "
            "pipe.load_ip_adapter(...) before opening the xattn session, or unload it (pipe.unload_ip_adapter())")

    def add_image_branch(self, attn, query, hidden_states, ip_states, active):  # pragma: no cover - see split_image_tokens
        raise NotImplementedError


def _borrow_maps(active, query, key, attention_mask):
    """``map_rows``: row r attends with row ``rows[r]``'s queries and keys, so it gets that row's map.

    softmax(Q_s K_s^T) V_r is row s's attention map applied to row r's values:
    prompt-to-prompt's map injection, computed by fused SDPA without ever
    materialising the map.
    """
    batch_size = query.shape[0]
    rows = active.run("map_rows", torch.arange(batch_size))  # on the CPU: checking it costs no device sync
    if rows.dtype != torch.long or rows.device.type != "cpu" or ((rows < 0) | (rows >= batch_size)).any():
        raise ValueError(f"map_rows hooks at {active.context.site.name} must return row indices in 0..{batch_size - 1} "
                         f"(a long CPU tensor), got {rows}")
    if attention_mask is not None and attention_mask.shape[0] == batch_size:
        attention_mask = attention_mask[rows]  # the borrowed map is the whole map, its mask included
    return query[rows], key[rows], attention_mask


def _add_logit_bias(active, attention_mask, query, key_length):
    """Fold ``logit_bias`` hooks into the additive mask: [b, h|1, 1|i, j]."""
    if not active.has("logit_bias"):
        return attention_mask
    batch_size = query.shape[0]
    zeros = torch.zeros(batch_size, key_length, dtype=query.dtype, device=query.device)
    bias = active.run("logit_bias", zeros)[:, None, None, :]  # [b, 1, 1, j]
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:  # True = keep, as SDPA reads boolean masks
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(~attention_mask, float("-inf"))
    return attention_mask + bias


def _explicit_attention(attn, query, key, value, attention_mask, token_scale, active):
    """softmax(QK^T·scale + mask) with the ``scores`` and ``probs`` hook points, then @ V."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale  # [b, h, i, j]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    scores = active.run("scores", scores)
    probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
    probs = probs.to(dtype)  # [b, h, i, j]
    if token_scale is not None:
        probs = probs * token_scale[:, None, None, :]
    probs = active.run("probs", probs)
    return torch.matmul(probs, value)  # [b, h, i, d]


def _remember_signature(cls: type) -> None:
    """Store ``cls.__call__``'s signature on it, so ``inspect.signature`` returns it without parsing again.

    diffusers' attention modules call ``inspect.signature(self.processor.__call__)`` at every call to filter
    their keyword arguments; on a small model that parsing is a visible share of a step.
    """
    call = cls.__dict__.get("__call__")
    if call is not None and not hasattr(call, "__signature__"):
        call.__signature__ = inspect.signature(call)


_remember_signature(XattnProcessor)

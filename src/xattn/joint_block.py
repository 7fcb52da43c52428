"""The joint core's ``probs`` point without the whole joint map, and the row / mask helpers it shares.

At a joint site the ``probs`` point shows the image->text block ``[b, h, i, j]``
of a softmax over image *and* text keys (``s`` keys in all). The explicit path
builds the whole ``[b, h, s, s]`` softmax for it. When no ``scores`` hook runs,
the block path builds only the block:

- the output and each row's log-sum-exp of its logits come from one fused
  kernel (PyTorch's CPU flash attention returns both), called on every row as
  stock calls it; only a reweighting (a bias on the text columns, or scaled
  text values) makes the image rows a call of their own;
- the block is ``exp(Q_img K_txtᵀ · scale + mask - lse)``: the softmax's own
  entries, with only ``i x j`` logits computed;
- ``probs`` hooks see it (times ``value_scale``); where they change it, the
  output gets the change through the text values: the image rows' output is
  ``P V``, linear in P, so ``out + (new - old) V_txt`` is what the changed map
  gives. The whole map is built only if a hook asks for it
  (:func:`xattn.joint.whole_joint_map`).

It serves calls on the CPU without gradients (the kernel's log-sum-exp has no
backward, and guidance differentiates through the maps); other calls take the
explicit path. Both give the same output to float32 rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def usable(active, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the block path can serve this call (see the module's docstring)."""
    if active.has("scores") or _FLASH_CPU is None or q.device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def block_attention(active, q, k, v, mask, scale: float, rows: slice, columns: slice, bias, weights,
                    hand_over: Callable) -> torch.Tensor:
    """Attention over the joint sequence, ``probs`` hooks on the rows x columns block: [b, h, s, d].

    ``hand_over(run)`` runs ``run()`` while :func:`xattn.joint.whole_joint_map` can
    build the whole map on demand.
    """
    length, keys = q.shape[2], k.shape[2]
    whole = bias is None and weights is None  # every row attends alike: one kernel call over all rows, as stock
    row_mask = additive(with_bias(mask, bias, columns, keys, q.dtype), q.dtype)  # [b, h|1, s|1, s]
    value = v if weights is None else scale_rows(v, weights, columns)
    query = q[:, :, rows]  # the kernel reads strided inputs: no copies
    if whole:
        out, lse = _FLASH_CPU(q, k, value, 0.0, False, attn_mask=row_mask, scale=scale)
        lse, row_mask = lse[:, :, rows], mask_rows(row_mask, rows)
    else:  # the image rows alone see the bias or the scaled text values
        row_mask = mask_rows(row_mask, rows)
        out, lse = _FLASH_CPU(query, k, value, 0.0, False, attn_mask=row_mask, scale=scale)
    scaled_query, text_keys = query * scale, k[:, :, columns].transpose(-1, -2)  # scale folded into i x d, not i x j

    def block() -> torch.Tensor:  # the softmax's image->text entries, times value_scale, built in place
        probs = torch.matmul(scaled_query, text_keys)  # [b, h, i, j] logits
        if probs.dtype != lse.dtype:
            probs = probs.to(lse.dtype)
        if row_mask is not None:
            probs.add_(row_mask[..., columns])
        probs = probs.sub_(lse[..., None]).exp_().to(q.dtype)
        return probs if weights is None else probs.mul_(weights[:, None, None, :])

    shown = block()
    version = shown._version
    new = hand_over(lambda: active.run("probs", shown))
    changed = new is not shown or shown._version != version
    if whole:
        if changed:  # a hook changed the map: add the change through V_txt to the image rows
            out[:, :, rows] += torch.matmul((new - block()).to(v.dtype), v[:, :, columns])
        return out
    if changed:
        out = out + torch.matmul((new - block()).to(v.dtype), v[:, :, columns])
    if rows == slice(0, length):
        return out
    other = others(rows, length)
    rest = F.scaled_dot_product_attention(q[:, :, other], k, v, attn_mask=mask_rows(mask, other), scale=scale)
    return torch.cat([out, rest] if rows.start == 0 else [rest, out], dim=2)


def additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """A boolean mask (True = keep) as an additive one."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))


def with_bias(mask, bias, columns: slice, keys: int, dtype) -> torch.Tensor | None:
    """The additive mask with ``bias`` on the text columns: [b, h|1, s|1, s]."""
    if bias is None:
        return mask
    full = torch.zeros(bias.shape[0], keys, dtype=dtype, device=bias.device)
    full[:, columns] = bias
    full = full[:, None, None, :]  # [b, 1, 1, s]
    return full if mask is None else additive(mask, dtype) + full


def scale_rows(v: torch.Tensor, weights: torch.Tensor, columns: slice) -> torch.Tensor:
    """V with its text rows scaled: P diag(c) V = P (diag(c) V).  [b, h, s, d]"""
    factor = torch.ones(v.shape[0], v.shape[2], dtype=v.dtype, device=v.device)
    factor[:, columns] = weights
    return v * factor[:, None, :, None]


def others(rows: slice, length: int) -> slice:
    """The query rows outside ``rows`` (one contiguous run: text and image sit at the two ends)."""
    return slice(rows.stop, length) if rows.start == 0 else slice(0, rows.start)


def mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


__all__ = ["additive", "block_attention", "mask_rows", "others", "scale_rows", "usable", "with_bias"]

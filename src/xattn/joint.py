"""Joint attention (SD3, Flux) and Sana's cross-attention: the stock processor runs, xattn takes its core.

In a joint block, image and text tokens attend together: one softmax over the
concatenated sequence (SD3: image then text; Flux: text then image). Each
stock processor keeps doing what it does (projections, QK norms, added
projections, rotary embeddings, single-stream layout, output split) and calls
its attention core once: SD3's ``F.scaled_dot_product_attention`` on
``[b, h, s, d]``, Flux's ``dispatch_attention_fn`` on ``[b, s, h, d]``. While
hooks run at a site, that one name in the processor's module is routed, for
this thread and this call only, to :func:`joint_attention`.

What the six points see at a joint site (rows = image queries, columns = text keys)::

    context      [b, j_txt, d]     text hidden states entering the (added) projections
    map_rows     [b]               row r uses row x[r]'s queries and keys: the whole joint map
    logit_bias   [b, j_txt]        added to the image->text logits only
    value_scale  [b, j_txt]        multiplies the image->text probabilities only
    scores       [b, h, i_img, j_txt]  the image->text block of the joint logits
    probs        [b, h, i_img, j_txt]  the image->text block of the joint softmax (a view)

``probs`` is a slice of softmax over image *and* text keys, so its rows sum to
the share of attention an image token gives the text (< 1). A hook that
returns a new block writes it back into the joint map. Text queries (the
text->text and text->image rows) are never changed by the fused points. At a self site served
by a joint processor (SD3.5's ``attn2``) rows and columns are the whole sequence;
at Sana's cross sites (``SanaAttnProcessor2_0``) image rows and text columns.

Dimensions: b rows, h heads, s joint sequence, i/j query/key positions, d head dim.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .concepts import live_stream
from .errors import UnsupportedProcessorError
from .joint_block import block_attention, mask_rows as _mask_rows, others as _others, scale_rows as _scale_rows, \
    usable, with_bias as _with_bias
from .processor import XattnProcessor
from .sites import PACKING, Site


@dataclass(frozen=True)
class Family:
    """Where one stock joint processor calls its attention core, and how it lays out the sequence."""

    name: str
    processor: type  # the stock processor class
    module: object  # the module whose global ``attribute`` the processor calls
    attribute: str  # "F" (its scaled_dot_product_attention) or "dispatch_attention_fn"
    sequence_dim: int  # 2: the core gets [b, h, s, d]; 1: [b, s, h, d]
    text_first: bool  # Flux: [text, image]; SD3: [image, text]
    takes_text: bool = True  # False: called (attn, hidden_states, attention_mask, ...), one stream only

    @property
    def core_name(self) -> str:
        """The patched global: families whose processors live in one module share it."""
        return f"{self.module.__name__}.{self.attribute}"


def _families() -> tuple[Family, ...]:
    from diffusers.models import attention_processor as sd3
    from diffusers.models.transformers import sana_transformer as sana, transformer_flux as flux

    families = (
        Family("sd3", sd3.JointAttnProcessor2_0, sd3, "F", sequence_dim=2, text_first=False),
        Family("flux", flux.FluxAttnProcessor, flux, "dispatch_attention_fn", sequence_dim=1, text_first=True),
        # Sana's cross-attention (attn2): plain image -> text attention, its own processor (QK norms over all heads)
        Family("sana", sana.SanaAttnProcessor2_0, sana, "F", sequence_dim=2, text_first=False),
    )
    try:  # Flux.2: dual-stream blocks, and single-stream blocks with fused QKV + MLP called without text
        from diffusers.models.transformers import transformer_flux2 as flux2
    except ImportError:
        return families
    return (*families,
            Family("flux2", flux2.Flux2AttnProcessor, flux2, "dispatch_attention_fn", sequence_dim=1, text_first=True),
            Family("flux2-single", flux2.Flux2ParallelSelfAttnProcessor, flux2, "dispatch_attention_fn",
                   sequence_dim=1, text_first=True, takes_text=False))


FAMILIES = _families()
JOINT_PROCESSORS = tuple(family.processor for family in FAMILIES)


def family_of(processor) -> Family | None:
    return next((family for family in FAMILIES if type(processor) is family.processor), None)


# (diffusers module, class): blocks whose attention sees text and image in one ``hidden_states``, each checked
# in its model's source (the text and image tokens are concatenated before the block or inside it).
_SINGLE_STREAM = (
    ("transformer_flux", "FluxSingleTransformerBlock"),  # [text, image]
    ("transformer_chroma", "ChromaSingleTransformerBlock"),  # [text, image], FluxAttnProcessor
    ("transformer_flux2", "Flux2SingleTransformerBlock"),  # [text, image]
    ("transformer_longcat_image", "LongCatImageSingleTransformerBlock"),  # [text, image]
    ("auraflow_transformer_2d", "AuraFlowSingleTransformerBlock"),  # [text, image]
    ("transformer_krea2", "Krea2TransformerBlock"),  # [text, image] (its text-fusion blocks see text only)
    ("transformer_ideogram4", "Ideogram4TransformerBlock"),  # text and image tokens in one sequence
    ("transformer_hunyuan_video", "HunyuanVideoSingleTransformerBlock"),  # [image, text]
    ("transformer_hunyuan_video", "HunyuanVideoTokenReplaceSingleTransformerBlock"),  # [image, text]
    ("transformer_hunyuanimage", "HunyuanImageSingleTransformerBlock"),  # [image, text]
    ("transformer_motif_video", "MotifVideoSingleTransformerBlock"),  # [image, text]
)
# Dual-stream attention modules whose text projections are not diffusers' ``add_*_proj`` (no ``added_kv_proj_dim``).
_DUAL_STREAM = (
    ("transformer_joyimage", "JoyImageAttention"),  # img_attn_qkv / txt_attn_qkv, one softmax over both
    ("transformer_joyimage_edit_plus", "JoyImageEditPlusAttention"),
    ("transformer_prx", "PRXAttention"),  # image queries over image and text keys (txt_kv_proj)
)


def _classes(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes of ``names`` already imported: a model built from one has imported its module, so nothing
    is imported here, and a diffusers version without one simply lacks it."""
    import sys

    found = (getattr(sys.modules.get(f"diffusers.models.transformers.{module}"), name, None)
             for module, name in names)
    return tuple(cls for cls in found if isinstance(cls, type))


def single_stream_blocks() -> tuple[type, ...]:  # attention over text and image in one ``hidden_states``
    return _classes(_SINGLE_STREAM)


def dual_stream_attentions() -> tuple[type, ...]:  # own text projections not named diffusers' ``add_*_proj``
    return _classes(_DUAL_STREAM)


def is_joint(module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether ``module`` attends over image and text tokens together."""
    if getattr(module, "added_kv_proj_dim", None) is not None:  # added (text) projections: a dual-stream block
        return True
    return isinstance(module, dual_stream_attentions()) or isinstance(parent, single_stream_blocks())


# -- routing the stock processor's core call ------------------------------------------------
_ROUTES = threading.local()  # per thread: Family.core_name -> the core the current stock call must use
_PATCHED: dict[str, list] = {}  # Family.core_name -> [original attribute, number of open routes]
_LOCK = threading.Lock()


class _Functional:
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` routed (SD3's processor calls ``F.``)."""

    def __init__(self, routed: Callable):
        self.scaled_dot_product_attention = routed

    def __getattr__(self, name):
        return getattr(F, name)


def _replacement(family: Family, original) -> object:
    call = original.scaled_dot_product_attention if family.attribute == "F" else original

    def routed(*args, **kwargs):
        core = getattr(_ROUTES, family.core_name, None)
        return call(*args, **kwargs) if core is None else core(*args, **kwargs)

    return _Functional(routed) if family.attribute == "F" else routed


@contextmanager
def routed(family: Family, core: Callable):
    """Within the block, this thread's calls of the family's core go to ``core``; other threads are untouched."""
    key = family.core_name
    with _LOCK:
        entry = _PATCHED.get(key)
        if entry is None:
            original = getattr(family.module, family.attribute)
            entry = _PATCHED[key] = [original, 0]
            setattr(family.module, family.attribute, _replacement(family, original))
        entry[1] += 1
    outer = getattr(_ROUTES, key, None)
    setattr(_ROUTES, key, core)
    try:
        yield
    finally:
        setattr(_ROUTES, key, outer)
        with _LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                setattr(family.module, family.attribute, entry[0])
                del _PATCHED[key]


# -- the processor ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parts:
    """Where the map's rows and columns sit in the joint sequence."""

    rows: slice  # image queries (everything at a self site)
    columns: slice  # text keys (everything at a self site)


class JointProcessor(XattnProcessor):
    """xattn at a site served by a stock joint processor: the stock one runs, its core is ours."""

    def __init__(self, site: Site, runtime, stock):
        super().__init__(site, runtime)
        self.stock = stock
        self.family = family_of(stock)
        if self.family is None:
            raise UnsupportedProcessorError(f"{type(stock).__name__} at {site.name} is not a joint processor "
                                            "xattn knows")

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs):
        if self.family.takes_text:
            return self._attend(attn, hidden_states, *args, **kwargs)
        return self._attend_one_stream(attn, hidden_states, *args, **kwargs)

    def _attend_one_stream(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, **unknown):
        """A processor called without text (Flux.2's single stream): text and image are in ``hidden_states``."""
        return self._attend(attn, hidden_states, None, attention_mask, image_rotary_emb, **unknown)

    def _stock(self, attn, hidden_states, encoder_hidden_states, attention_mask, **extra):
        if self.family.takes_text:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        return self.stock(attn, hidden_states, attention_mask, **extra)

    def _attend(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb=None, **unknown):
        if unknown:
            raise UnsupportedProcessorError(f"xattn's processor at {self.site.name} takes no {sorted(unknown)}; "
                                            "close the xattn session to use them")
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        stream = live_stream()  # concept rows ride after the text while xattn.concepts runs (dual stream only)
        concepts = stream.rows if stream is not None and encoder_hidden_states is not None \
            and self.site.kind == "joint" else 0
        parts = self._parts(hidden_states, encoder_hidden_states, concepts)
        active = self.runtime.active_hooks(self.site, parts.rows.stop - parts.rows.start)
        if active is None:  # nothing runs here this call: the stock processor, untouched
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if active.has("context"):
            hidden_states, encoder_hidden_states = self._context(active, parts, hidden_states, encoder_hidden_states,
                                                                 concepts)
        calls = []

        def core(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
            if dropout_p or is_causal or rest.get("enable_gqa"):
                raise UnsupportedProcessorError(f"{self.site.name}: xattn's joint core takes no dropout, causal "
                                                "mask or grouped-query attention")
            calls.append(1)
            dim = self.family.sequence_dim
            q, k, v = (x.transpose(1, 2) if dim == 1 else x for x in (query, key, value))  # [b, h, s, d]
            if concepts:  # the image and text rows get the usual core on their own keys; concept rows read all
                out = stream.attend(q, k, v, scale, lambda q, k, v: joint_attention(active, q, k, v, attn_mask, scale,
                                                                                    parts))
            else:
                out = joint_attention(active, q, k, v, attn_mask, scale, parts)  # [b, h, s, d]
            return out.transpose(1, 2) if dim == 1 else out

        with routed(self.family, core):
            out = self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if len(calls) != 1:
            raise UnsupportedProcessorError(
                f"{type(self.stock).__name__} at {self.site.name} called its attention core {len(calls)} time(s), "
                "not once: this diffusers version computes joint attention differently from what xattn hooks")
        return out

    def _parts(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               concepts: int = 0) -> Parts:
        length = hidden_states.shape[1]
        if self.site.kind != "joint":  # a self site: the whole sequence; a cross site: image rows, text columns
            keys = length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            return Parts(slice(0, length), slice(0, keys))
        if encoder_hidden_states is not None:  # dual stream: image and text arrive apart
            image, text = length, encoder_hidden_states.shape[1] - concepts
        else:  # single stream: [text, image] in one sequence; the image part is the latent's token grid
            image = _image_tokens(self.runtime, self.site)
            text = length - image
            if text < 0:
                raise ValueError(f"{self.site.name}: {length} tokens cannot hold the latent's {image} image tokens")
        if self.family.text_first:
            return Parts(rows=slice(text, text + image), columns=slice(0, text))
        return Parts(rows=slice(0, image), columns=slice(image, image + text))

    def _context(self, active, parts: Parts, hidden_states, encoder_hidden_states, concepts: int = 0):
        """The ``context`` point: the text tokens' hidden states, before any projection (concept rows left out)."""
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1] - concepts
            changed = active.run("context", encoder_hidden_states[:, :text] if concepts else encoder_hidden_states)
            return hidden_states, torch.cat([changed, encoder_hidden_states[:, text:]], dim=1) if concepts else changed
        text = active.run("context", hidden_states[:, parts.columns])  # [b, j, d] (single stream)
        rest = hidden_states[:, parts.rows]
        pieces = (text, rest) if self.family.text_first else (rest, text)
        return torch.cat(pieces, dim=1), None


def _image_tokens(runtime, site: Site) -> int:
    """Image tokens of the current denoiser call (a packed latent: one token per PACKING x PACKING patch)."""
    call = getattr(runtime, "call", None)
    if call is None:
        raise ValueError(f"{site.name} is a single-stream joint site: xattn learns where its text ends from the "
                         "denoiser call, so call the whole model, not the attention module alone")
    height, width = call.latent_hw
    return math.ceil(height / PACKING) * math.ceil(width / PACKING)


# -- the core -----------------------------------------------------------------------------------
def joint_attention(active, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float | None, parts: Parts) -> torch.Tensor:
    """Attention over the joint sequence with the hook points on the rows x columns block: [b, h, s, d]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, length, keys = q.shape[0], q.shape[2], k.shape[2]
    if active.has("map_rows"):
        q, k, mask = _borrow(active, q, k, mask)
    columns = parts.columns.stop - parts.columns.start
    bias = weights = None
    if active.has("logit_bias"):
        bias = active.run("logit_bias", torch.zeros(batch, columns, dtype=q.dtype, device=q.device))  # [b, j]
    if active.has("value_scale"):
        weights = active.run("value_scale", torch.ones(batch, columns, dtype=q.dtype, device=q.device))  # [b, j]
    if active.explicit:
        return _explicit(active, q, k, v, mask, scale, parts, bias, weights)
    if bias is None and weights is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # The block's queries see a biased mask and scaled text values; the other queries see neither.
    # Queries are independent, so two SDPA calls over row ranges are exact and build no map.
    block_mask = _with_bias(mask, bias, parts.columns, keys, q.dtype)  # [b, h|1, s|1, s]
    block_value = v if weights is None else _scale_rows(v, weights, parts.columns)
    if parts.rows == slice(0, length):
        return F.scaled_dot_product_attention(q, k, block_value, attn_mask=block_mask, scale=scale)
    pieces = []
    for rows, value, row_mask in ((parts.rows, block_value, block_mask), (_others(parts.rows, length), v, mask)):
        pieces.append((rows.start, F.scaled_dot_product_attention(
            q[:, :, rows], k, value, attn_mask=_mask_rows(row_mask, rows), scale=scale)))  # [b, h, i', d]
    return torch.cat([out for _, out in sorted(pieces, key=lambda piece: piece[0])], dim=2)


def _explicit(active, q, k, v, mask, scale, parts: Parts, bias, weights) -> torch.Tensor:
    """softmax over the joint keys, with ``scores`` / ``probs`` hooks on the rows x columns block, then @ V."""
    rows, columns = parts.rows, parts.columns
    if usable(active, q, k, v):  # probs hooks only, no gradients: the block alone (joint_block.py)
        return block_attention(active, q, k, v, mask, scale, rows, columns, bias, weights,
                               lambda run: _handing_over(lambda: _whole(q, k, mask, scale, parts, bias), run))
    scores = _scores(q, k, mask, scale, parts, bias)  # [b, h, s, s]
    if active.has("scores"):
        block = scores[:, :, rows, columns]  # [b, h, i, j]: a view
        new = active.run("scores", block)
        if new is not block:
            scores[:, :, rows, columns] = new
    probs = scores.float().softmax(dim=-1).to(q.dtype)  # [b, h, s, s]
    block = probs[:, :, rows, columns]  # [b, h, i, j]: a view of the joint map
    new = block if weights is None else block * weights[:, None, None, :]
    new = _handing_over((probs, parts), lambda: active.run("probs", new))  # read-only: see whole_joint_map()
    if new is not block:
        probs = probs.clone()  # softmax's output is saved for its backward: write into a copy
        probs[:, :, rows, columns] = new
    return torch.matmul(probs, v)  # [b, h, s, d]


def _scores(q, k, mask, scale, parts: Parts, bias) -> torch.Tensor:
    """The joint logits with the mask, and ``logit_bias`` on the block: [b, h, s, s]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if bias is not None:
        scores[:, :, parts.rows, parts.columns] += bias[:, None, None, :]
    return scores


def _whole(q, k, mask, scale, parts: Parts, bias):
    return _scores(q, k, mask, scale, parts, bias).float().softmax(dim=-1).to(q.dtype), parts


def _handing_over(whole, run: Callable):
    """``run()`` while :func:`whole_joint_map` hands ``whole`` over (or what calling it builds, on demand)."""
    outer = getattr(_WHOLE, "map", None)
    _WHOLE.map = whole
    try:
        return run()
    finally:
        _WHOLE.map = outer


_WHOLE = threading.local()  # this thread's (whole joint softmax, Parts), or how to build it, while probs hooks run


def whole_joint_map() -> tuple[torch.Tensor, Parts] | None:
    """For a ``probs`` hook at a joint site that asks: the whole joint softmax and where its blocks sit.

    Returns ``(probs, parts)`` while this thread's ``probs`` hooks run at a joint site, else None:
    ``probs`` is ``[b, h, s, s]`` over the joint sequence (the image->text block before ``value_scale``
    and before any ``probs`` hook's change), ``parts.rows`` the image and ``parts.columns`` the text
    positions. It is read-only: write nothing into it (the output is ``probs @ V``); a hook changes the
    map only by returning a new image->text block.
    The block path (:mod:`xattn.joint_block`) builds it only when this is called, once per call;
    ``xattn.Capture(blocks=...)`` reads the other blocks from it.
    """
    handed = getattr(_WHOLE, "map", None)
    if callable(handed):  # the block path built no whole map: build it now, once
        handed = _WHOLE.map = handed()
    return handed


def _borrow(active, q, k, mask):
    """``map_rows`` over the whole joint attention: row r uses row rows[r]'s queries and keys."""
    batch = q.shape[0]
    rows = active.run("map_rows", torch.arange(batch))
    if rows.dtype != torch.long or rows.device.type != "cpu" or ((rows < 0) | (rows >= batch)).any():
        raise ValueError(f"map_rows hooks at {active.context.site.name} must return row indices in 0..{batch - 1} "
                         f"(a long CPU tensor), got {rows}")
    if mask is not None and mask.shape[0] == batch:
        mask = mask[rows]
    return q[rows], k[rows], mask


__all__ = ["FAMILIES", "JOINT_PROCESSORS", "Family", "JointProcessor", "Parts", "family_of", "is_joint",
           "joint_attention", "routed", "whole_joint_map"]

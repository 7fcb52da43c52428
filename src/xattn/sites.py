"""Attention sites: every attention module of a model, named by its module path.

A site is where a hook can run. Its name is the path diffusers itself uses in
``unet.attn_processors`` (minus the ``.processor`` suffix), so names are never
invented and never repeat. The spatial resolution of a site is *not* stored:
it depends on the latent size of the call and is derived at run time by
:func:`resolution_of`.

Kinds: ``cross`` (image queries, text keys: a UNet's, PixArt's or Sana's ``attn2``),
``self`` (image to image), ``joint`` (image and text tokens in one attention:
SD3's joint blocks, Flux's and Chroma's double- and single-stream blocks; see
:mod:`xattn.joint`). A joint site's hook points show its image->text block,
so selectors read ``kind=cross`` as "cross or joint". Linear-attention modules
(Sana's ``attn1``) have no map and are not sites (:func:`not_sites`).

A model without ``attn_processors`` is refused with
:class:`~xattn.errors.UnsupportedModelError`, an attention module whose heads
or head size cannot be read with :class:`~xattn.errors.UnsupportedAttentionError`;
both name the model's class (and the site's module path).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any
from typing import Literal

from torch import nn

from .errors import UnsupportedAttentionError, UnsupportedModelError

Kind = Literal["cross", "self", "joint"]
Block = Literal["down", "mid", "up", "other"]

_PROCESSOR_SUFFIX = ".processor"
PACKING = 2  # Flux pipelines pack each 2 x 2 patch of the latent into one token


@dataclass(frozen=True)
class Site:
    """One attention module: where it is and what it attends to."""

    name: str  # module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    kind: Kind  # "cross": queries attend to the text; "self": to the image itself; "joint": image and text together
    block: Block  # which half of the UNet the module sits in
    heads: int
    head_dim: int

    def __str__(self) -> str:
        return self.name


def _block_of(name: str) -> Block:
    first = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(first, "other")


def _check_registry(model: nn.Module) -> None:
    """Refuse, by name, a model that keeps no registry of its attention processors."""
    if not hasattr(model, "attn_processors"):
        cls = type(model)
        raise UnsupportedModelError(
            f"{cls.__module__}.{cls.__qualname__} has no `attn_processors`, so xattn can neither list nor replace "
            "its attention processors; it needs a diffusers model that has them (UNet2DConditionModel, SD3, Flux, "
            "PixArt...) or a pipeline holding one"
        )


# Linear-attention processors (diffusers module, class): relu(Q)(relu(K)^T V), normalised, with no softmax and no
# [i, j] map, so no hook point has anything to show there. Their modules are not sites: they are left untouched.
_LINEAR = (
    ("diffusers.models.attention_processor", "SanaLinearAttnProcessor2_0"),  # Sana's self-attention (attn1)
    ("diffusers.models.attention_processor", "PAGCFGSanaLinearAttnProcessor2_0"),
    ("diffusers.models.attention_processor", "PAGIdentitySanaLinearAttnProcessor2_0"),
    ("diffusers.models.transformers.transformer_sana_video", "SanaLinearAttnProcessor3_0"),
)
NOT_A_SITE = "not a site"  # how :func:`xattn.install.hookable` marks the modules below


def linear_attention(processor) -> str | None:
    """Why a module holding ``processor`` is not a site (linear attention), or None."""
    import sys

    cls = type(processor)
    if (cls.__module__, cls.__name__) in _LINEAR and getattr(sys.modules.get(cls.__module__), cls.__name__, None) is cls:
        return f"{NOT_A_SITE}: {cls.__name__} is linear attention (no softmax map to hook); left untouched"
    return None


def not_sites(model: nn.Module) -> dict[str, str]:
    """Module path -> why, for the modules with a processor that are not sites (linear attention)."""
    _check_registry(model)
    found = {key[: -len(_PROCESSOR_SUFFIX)]: linear_attention(p) for key, p in model.attn_processors.items()}
    return {name: reason for name, reason in found.items() if reason is not None}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> attention module, for every site: a module with a ``processor`` that has a map.

    Uses ``attn_processors`` (diffusers' own registry) so the names match the keys
    that ``set_attn_processor`` accepts. Linear-attention modules (Sana's
    ``attn1``) are not sites (:func:`not_sites`).
    """
    _check_registry(model)
    names = [key[: -len(_PROCESSOR_SUFFIX)] for key, processor in model.attn_processors.items()
             if linear_attention(processor) is None]
    modules = dict(model.named_modules())
    return {name: modules[name] for name in names}


def _kind_of(module: nn.Module, parent: nn.Module | None) -> Kind:
    from .joint import is_joint

    if getattr(module, "is_cross_attention", False):
        return "cross"
    return "joint" if is_joint(module, parent) else "self"


def _count(value) -> int | None:
    """``value`` as a positive int, or None (a missing attribute, a module, a non-integer)."""
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number > 0 else None


def _shape_of(name: str, module: nn.Module, owner: str) -> tuple[int, int]:
    """(heads, head_dim) of an attention module: heads from ``heads`` (diffusers' ``Attention``) or
    ``num_heads``, the head size from ``to_q``'s width (a LoRA-wrapped one too) or ``head_dim`` (fused QKV)."""
    heads = _count(getattr(module, "heads", None)) or _count(getattr(module, "num_heads", None))
    width = _count(getattr(getattr(module, "to_q", None), "out_features", None))
    head_dim = width // heads if width and heads else _count(getattr(module, "head_dim", None))
    if heads and head_dim:
        return heads, head_dim
    missing = [] if heads else ["no head count (`heads` or `num_heads`)"]
    if not head_dim:
        missing.append("no head size (a `to_q` projection or `head_dim`)")
    cls = type(module)
    raise UnsupportedAttentionError(
        f"site {name} of {owner} holds a {cls.__module__}.{cls.__qualname__}, an attention module xattn does not "
        f"understand: it has {' and '.join(missing)}"
    )


def _site_of(name: str, module: nn.Module, parent: nn.Module | None = None, owner: str = "the model") -> Site:
    heads, head_dim = _shape_of(name, module, owner)
    return Site(
        name=name,
        kind=_kind_of(module, parent),
        block=_block_of(name),
        heads=heads,
        head_dim=head_dim,
    )


def denoiser_of(model) -> nn.Module:
    """The module that owns the attention: a pipeline's UNet/transformer, or the model itself."""
    for attribute in ("unet", "transformer"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "attn_processors"):
            return inner
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        f"cannot find a denoiser in {type(model).__name__}: expected a diffusers pipeline with a "
        "`unet` or `transformer`, or the model itself"
    )


def attention_hosts(model) -> dict[str, nn.Module]:
    """Name prefix -> each model that owns attention processors: the denoiser, then any ControlNets.

    The denoiser's sites keep their own module paths (prefix ``""``); a
    pipeline's ControlNet sites are named by their path under the pipeline,
    ``controlnet.down_blocks...`` (``controlnet.nets.1.down_blocks...`` for the
    second of several), so ``sites=controlnet.*`` selects them.
    """
    denoiser = denoiser_of(model)
    _check_registry(denoiser)
    hosts = {"": denoiser}
    controlnet = getattr(model, "controlnet", None) if model is not denoiser else None
    if isinstance(controlnet, nn.Module):
        if hasattr(controlnet, "attn_processors"):
            hosts["controlnet."] = controlnet
        else:  # several ControlNets
            for index, net in enumerate(getattr(controlnet, "nets", [])):
                hosts[f"controlnet.nets.{index}."] = net
    return hosts


def sites(model) -> list[Site]:
    """Every attention site of a diffusers model or pipeline, in module order.

    Args:
        model: a pipeline (its ``unet`` or ``transformer``, then any
            ControlNets) or a model exposing ``attn_processors``; or a
            transformers encoder–decoder model, whose decoder attention
            :mod:`xattn.seq2seq` lists (imported here lazily: that module
            builds on this one).
    """
    from .seq2seq import is_transformers_model, seq2seq_sites

    if is_transformers_model(model):
        return seq2seq_sites(model)
    found = []
    for prefix, host in attention_hosts(model).items():
        modules = dict(host.named_modules())
        owner = f"{type(host).__module__}.{type(host).__qualname__}"
        for name, module in attention_modules(host).items():
            site = _site_of(prefix + name, module, modules.get(name.rpartition(".")[0]), owner)
            found.append(site)
    return found


def one_map_size(model) -> bool:
    """Whether every site of ``model`` sees one map size, its latent's patch grid (a transformer: SD3, Flux,
    PixArt, Sana), rather than a UNet's pyramid; there, sizes written for a UNet (``res=16,8``) match nothing."""
    return not any(site.block in ("down", "mid", "up") for site in sites(model))


def latent_size(sample, arguments: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of the latent behind a denoiser call's input.

    ``[b, c, H, W]`` latents (UNets, SD3, PixArt) give it directly. Flux's
    packed tokens ``[b, n, c]`` carry their grid in ``img_ids`` (row, column
    per token): the latent is ``PACKING`` times that grid, so that a site's
    map, (H/2, W/2), is the token grid at any aspect ratio.
    """
    if sample.ndim == 4:
        return int(sample.shape[-2]), int(sample.shape[-1])
    ids = arguments.get("img_ids")
    tokens = int(sample.shape[1])
    if sample.ndim == 3 and ids is not None:
        ids = ids[0] if ids.ndim == 3 else ids  # [n, 3]: (frame, row, column); Flux.2: [n, 4], a layer after
        rows, columns = (int(v) + 1 for v in ids[:, 1:3].amax(dim=0).tolist())
        if rows * columns == tokens:
            return rows * PACKING, columns * PACKING
    side = math.isqrt(tokens)  # a sequence without a known grid: square when it can be, else flat
    return (side, side) if side * side == tokens else (1, tokens)


def resolution_of(query_length: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial (h, w) of a site's queries, from the query length and the latent's (H, W).

    UNet stages halve the size with stride-2 convolutions (rounding up), so a
    site that is ``f`` times down has ``ceil(H/f) * ceil(W/f)`` queries. We
    search the factors rather than assume a table of sizes, which keeps any
    aspect ratio and odd size right.
    """
    height, width = latent_hw
    factor = 1
    while factor <= max(height, width):
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w == query_length:
            return h, w
        factor *= 2
    # Not a power-of-two pyramid (e.g. a patchified transformer): fall back to
    # the square (or the flat sequence) rather than guessing.
    side = math.isqrt(query_length)
    if side * side == query_length:
        return side, side
    return 1, query_length


def format_table(site_list: list[Site], hookable: dict[str, str | None] | None = None) -> str:
    """A plain-text table of sites, for ``xattn sites``.

    ``hookable`` maps a site name to None (xattn can hook it) or the reason
    it cannot; given, it adds a ``hookable`` column.
    """
    header = ("name", "kind", "block", "heads", "head_dim") + (("hookable",) if hookable is not None else ())
    rows = []
    for s in site_list:
        row = (s.name, s.kind, s.block, str(s.heads), str(s.head_dim))
        if hookable is not None:
            reason = hookable.get(s.name)
            row += ("yes" if reason is None else f"no: {reason}",)
        rows.append(row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    listed = {s.name for s in site_list}
    skipped = {name: reason for name, reason in (hookable or {}).items()
               if name not in listed and reason and reason.startswith(NOT_A_SITE)}
    if skipped:  # e.g. Sana's linear self-attention: say why it is missing
        by_reason: dict[str, list[str]] = {}
        for name, reason in skipped.items():
            by_reason.setdefault(reason[len(NOT_A_SITE) + 2:], []).append(name)
        lines.append("")
        lines += [f"not sites ({len(names)} modules, e.g. {names[0]}): {reason}" for reason, names in by_reason.items()]
    return "\n".join(lines)



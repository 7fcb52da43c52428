"""IP-Adapter: the decoupled image branch reproduced, its maps at their own points.

diffusers' ``IPAdapterAttnProcessor2_0`` (and ``IPAdapterAttnProcessor``) at a
cross site computes the text attention, then adds, per adapter ``a``::

    scale_a * softmax(Q K_a^T / sqrt(d)) V_a        K_a, V_a = to_k_ip[a], to_v_ip[a] of the image tokens

where the image tokens are what the UNet's ``encoder_hid_proj``
(``MultiIPAdapterImageProjection``) made of ``added_cond_kwargs["image_embeds"]``,
and ``scale_a`` is what ``pipe.set_ip_adapter_scale`` set at this layer.
:class:`XattnIPAdapterProcessor` is xattn's processor plus that branch:

- the six points keep their meaning: they see the *text* attention only
  (``j`` = the text slots); ``Reweight``, edits (``map_rows`` included) and
  guidance change the text attention and never the image branch, which is
  always added as the stock processor adds it, with the row's own queries;
- the image branch has two points of its own, ``ip_scores`` and ``ip_probs``
  (``[b, h, i, n_a]``, ``n_a`` = adapter ``a``'s image tokens, every image
  of that adapter side by side), run once per adapter; ``ctx.point`` is
  ``"ip:<a>.scores"`` / ``"ip:<a>.probs"`` (:func:`adapter_of` reads ``a``).
  Only controllers that name them run there (:class:`IPHook`,
  :class:`IPCapture`); with none the branch is fused SDPA, as in diffusers.
  An adapter whose scale is 0 at a layer is skipped there, as diffusers
  skips it, so its points do not run.

It shares the stock processor's ``to_k_ip`` / ``to_v_ip`` modules and its
``scale`` list (so ``set_ip_adapter_scale`` works inside a session too, and
the weights stay in the UNet's module tree), and is an instance of
``IPAdapterAttnProcessor2_0`` so diffusers' own IP-Adapter code finds it.

IP-Adapter masks (``cross_attention_kwargs={"ip_adapter_masks": [...]}``, one
``[1, n_images, H, W]`` mask per adapter, made by diffusers'
``IPAdapterMaskProcessor``) are applied as the stock processor applies them:
each image of a masked adapter attends on its own (its own softmax over its
own tokens), its output is multiplied by the mask downsampled to the site
(``IPAdapterMaskProcessor.downsample``) and by its scale (a per-image scale
list is honoured there), and added. With masks, ``ip_scores`` / ``ip_probs``
still see ``[b, h, i, n_a]`` with the images side by side, but each image's
tokens sum to 1 on their own.

Refused by name: per-image scale lists on an adapter without a mask (diffusers
applies them only with masks), an IP processor on a model without the IP
image projection (diffusers' deprecated path that reads the image tokens off
the end of the text), and attention modules where the stock processor would
differ from xattn's text attention (Q/K norms, a non-default softmax scale).
"""

from __future__ import annotations

import math

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedProcessorError
from .hookpoints import Controller, HookContext, HookError, HookFn
from .processor import XattnProcessor
from .selector import Selector

IP_POINTS = ("ip_scores", "ip_probs")


def stock_classes() -> tuple[type, ...]:
    """diffusers' IP-Adapter processors that xattn reproduces (exact classes)."""
    from diffusers.models import attention_processor as ap

    return tuple(getattr(ap, name) for name in ("IPAdapterAttnProcessor2_0", "IPAdapterAttnProcessor")
                 if hasattr(ap, name))


def is_ip_processor(processor) -> bool:
    return type(processor) in stock_classes()


def projection_problem(host) -> str | None:
    """Why IP-Adapter processors on ``host`` are not reproduced, or None when they are."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    config = getattr(host, "config", None)
    if isinstance(getattr(host, "encoder_hid_proj", None), MultiIPAdapterImageProjection) and \
            getattr(config, "encoder_hid_dim_type", None) == "ip_image_proj":
        return None
    return ("its model has no IP-Adapter image projection (encoder_hid_proj), so the image tokens would be "
            "read off the end of the text (diffusers' deprecated path), which xattn does not reproduce; load the "
            "adapter with pipe.load_ip_adapter(...), or unload it (pipe.unload_ip_adapter())")


def adapter_of(ctx: HookContext) -> int | None:
    """The adapter index an ``ip_scores`` / ``ip_probs`` hook runs for (``ctx.point`` ``"ip:<a>.probs"``)."""
    found = re.fullmatch(r"ip:(\d+)\.(scores|probs)", ctx.point)
    return int(found.group(1)) if found else None


def _ip_base():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    return IPAdapterAttnProcessor2_0


class XattnIPAdapterProcessor(XattnProcessor, _ip_base()):
    """xattn's processor at a site that had diffusers' IP-Adapter processor ``stock``; see the module docstring."""

    def __init__(self, site, runtime, stock):
        nn.Module.__init__(self)  # not IPAdapterAttnProcessor2_0.__init__: the weights are the stock ones
        XattnProcessor.__init__(self, site, runtime)
        self.hidden_size = stock.hidden_size
        self.cross_attention_dim = stock.cross_attention_dim
        self.num_tokens = stock.num_tokens
        self.scale = stock.scale  # the same list: set_ip_adapter_scale's writes reach both
        self.to_k_ip = stock.to_k_ip  # the same modules: the UNet's parameters, state dict keys unchanged
        self.to_v_ip = stock.to_v_ip

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_adapter_masks=None, **unknown):
        # The masks ride with the image tokens to add_image_branch (diffusers passes them by this name only).
        if ip_adapter_masks is not None and isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states = (*encoder_hidden_states, ip_adapter_masks)
        return XattnProcessor.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                       **unknown)

    def split_image_tokens(self, states: tuple) -> tuple[torch.Tensor, tuple]:
        text, images, *masks = states
        if not isinstance(images, (list, tuple)) or len(images) != len(self.to_k_ip):
            count = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
            raise UnsupportedProcessorError(f"site {self.site.name} has {len(self.to_k_ip)} IP-Adapter(s) but got "
                                            f"image tokens for {count}")
        images = list(images)
        return text, (images, _check_masks(masks[0] if masks else None, self.scale, images))

    def add_image_branch(self, attn, query, hidden_states, ip_states, active):
        """``hidden_states + scale_a * softmax(Q K_a^T / sqrt(d)) V_a`` per adapter, as diffusers adds it."""
        ip_states, masks = ip_states
        batch_size, heads, _, head_dim = query.shape  # [b, h, i, d]
        _check_module(attn, head_dim, self.site.name)
        hooked = active is not None and any(active.has(point) for point in IP_POINTS)
        for index, (states, scale, to_k, to_v, mask) in enumerate(
                zip(ip_states, self.scale, self.to_k_ip, self.to_v_ip, masks)):
            if isinstance(scale, (list, tuple)) and mask is None:
                raise UnsupportedProcessorError(
                    f"site {self.site.name}: IP-Adapter {index} has one scale per image ({scale}), which diffusers "
                    "applies only with ip_adapter_masks; give it a mask, or one scale per adapter")
            if all(s == 0 for s in scale) if isinstance(scale, (list, tuple)) else scale == 0:
                continue  # diffusers skips the adapter here; so do its points
            if mask is not None:
                hidden_states = _masked_branch(attn, query, hidden_states, states, scale, to_k, to_v, mask,
                                               active if hooked else None, index)
                continue
            key = to_k(states).view(batch_size, -1, heads, head_dim).transpose(1, 2)  # [b, h, n_a, d]
            value = to_v(states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            if hooked:
                out = _explicit_image_attention(attn, query, key, value, active, index)
            else:
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)  # [b, i, h*d]
            hidden_states = hidden_states + scale * out
        return hidden_states


def _check_masks(masks, scales, images: list) -> list:
    """``ip_adapter_masks`` as one entry per adapter (None: unmasked), checked as diffusers checks them."""
    if masks is None:
        return [None] * len(scales)
    if not isinstance(masks, list):
        masks = list(masks.unsqueeze(1))  # diffusers' older form: [n_adapters, 1, H, W]
    if not (len(masks) == len(scales) == len(images)):
        raise ValueError(f"Length of ip_adapter_masks array ({len(masks)}) must match length of self.scale array "
                         f"({len(scales)}) and number of ip_hidden_states ({len(images)})")
    for index, (mask, scale, states) in enumerate(zip(masks, scales, images)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise ValueError("Each element of the ip_adapter_masks array should be a tensor with shape "
                             "[1, num_images_for_ip_adapter, height, width]. Please use `IPAdapterMaskProcessor` "
                             "to preprocess your mask")
        if mask.shape[1] != states.shape[1]:
            raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of ip images "
                             f"({states.shape[1]}) at index {index}")
        if isinstance(scale, list) and not len(scale) == mask.shape[1]:
            raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of scales ({len(scale)}) "
                             f"at index {index}")
    return masks


def _masked_branch(attn, query, hidden_states, states, scale, to_k, to_v, mask, active, index: int):
    """diffusers' masked image branch: each image on its own, times its downsampled mask and its scale.

    With hooks (``active``), the images' scores and probs are put side by side
    (``[b, h, i, n_images * tokens]``) for ``ip_scores`` / ``ip_probs``, each
    image's softmax its own; without, each image is fused SDPA, as in diffusers.
    """
    from diffusers.image_processor import IPAdapterMaskProcessor

    batch_size, heads, _, head_dim = query.shape
    count = mask.shape[1]
    scales = scale if isinstance(scale, (list, tuple)) else [scale] * count
    keys, values = [], []
    for image in range(count):
        keys.append(to_k(states[:, image]).view(batch_size, -1, heads, head_dim).transpose(1, 2))  # [b, h, t, d]
        values.append(to_v(states[:, image]).view(batch_size, -1, heads, head_dim).transpose(1, 2))
    if active is None:
        outs = [F.scaled_dot_product_attention(query, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
                for k, v in zip(keys, values)]
    else:
        outs = _explicit_masked_attention(attn, query, keys, values, active, index)
    for image, out in enumerate(outs):
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)  # [b, i, h*d]
        down = IPAdapterMaskProcessor.downsample(mask[:, image, :, :], batch_size, out.shape[1], out.shape[2])
        down = down.to(dtype=query.dtype, device=query.device)
        hidden_states = hidden_states + scales[image] * (out * down)
    return hidden_states


def _explicit_masked_attention(attn, query, keys, values, active, index: int) -> list:
    """Per-image softmax(Q K^T / sqrt(d)) with the points run on the images side by side; per-image outputs."""
    dtype = query.dtype
    widths = [k.shape[2] for k in keys]
    scores = torch.cat([torch.matmul(query, k.transpose(-1, -2)) for k in keys], -1) * query.shape[-1] ** -0.5
    scores = _run(active, "ip_scores", index, scores)
    parts = scores.split(widths, dim=-1)
    probs = torch.cat([(p.float().softmax(dim=-1) if attn.upcast_softmax else p.softmax(dim=-1)).to(dtype)
                       for p in parts], -1)
    probs = _run(active, "ip_probs", index, probs)
    return [torch.matmul(p, v) for p, v in zip(probs.split(widths, dim=-1), values)]


def _check_module(attn, head_dim: int, name: str) -> None:
    """The stock IP processor ignores Q/K norms and ``attn.scale``; xattn's text attention does not."""
    if attn.norm_q is not None or attn.norm_k is not None or abs(attn.scale - head_dim ** -0.5) > 1e-12:
        raise UnsupportedProcessorError(
            f"site {name}: diffusers' IP-Adapter processor ignores this module's Q/K norms or softmax scale, "
            "which xattn's text attention applies; the two would differ, so xattn does not hook it")


def _explicit_image_attention(attn, query, key, value, active, index: int) -> torch.Tensor:
    """softmax(Q K_a^T / sqrt(d)) with the ``ip:<a>.scores`` / ``ip:<a>.probs`` points, then @ V_a."""
    dtype = query.dtype
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5  # [b, h, i, n_a]
    scores = _run(active, "ip_scores", index, scores)
    probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
    probs = _run(active, "ip_probs", index, probs.to(dtype))
    return torch.matmul(probs, value)  # [b, h, i, d]


def _run(active, point: str, index: int, x: torch.Tensor) -> torch.Tensor:
    """Run ``point``'s hooks with ``ctx.point`` = ``"ip:<index>.<scores|probs>"``."""
    fns = active.by_point.get(point)
    if not fns:
        return x
    name = f"ip:{index}.{point[len('ip_'):]}"
    return type(active)(active.context, {name: fns}).run(name, x)


def reproduce(made: XattnProcessor, stock) -> XattnIPAdapterProcessor:
    """The processor that replaces the IP-Adapter processor ``stock`` at ``made``'s site."""
    return XattnIPAdapterProcessor(made.site, made.runtime, stock)


# -- controllers at the image-branch points -----------------------------------------------

class IPHook(Controller):
    """A function at ``ip_scores`` or ``ip_probs`` (``"<site glob>.ip_probs"`` names its sites too).

    ``fn(x, ctx) -> Tensor | None`` with ``x`` ``[b, h, i, n_a]``, once per
    adapter; :func:`adapter_of` gives ``a``. Returning a tensor changes the
    image branch only (the text attention is not touched).
    """

    def __init__(self, point: str, fn: HookFn, selector: Selector | str | dict | None = None):
        if not callable(fn):
            raise HookError(f"hook {point!r}: {fn!r} is not callable; pass fn(x, ctx) -> Tensor | None")
        site_glob, _, point_name = point.rpartition(".")
        if point_name not in IP_POINTS:
            raise HookError(f"IP-Adapter hook point {point!r} does not end in one of {', '.join(IP_POINTS)}")
        self.selector = Selector.coerce(selector, kind="cross")
        if site_glob:
            if self.selector.sites is not None:
                raise HookError(f"hook {point!r} names its sites; do not also give `sites` in the selector")
            self.selector = replace(self.selector, sites=(site_glob,))
        self.point, self.fn = point_name, fn

    def points(self) -> dict[str, HookFn]:
        return {self.point: self.fn}

    def __repr__(self) -> str:
        return f"IPHook({self.point!r}, {getattr(self.fn, '__name__', self.fn)!r}, selector='{self.selector}')"


class IPWeight(Controller):
    """Weight an IP-Adapter's image prompt like a word: its branch times ``weight``, where and when selected.

    The branch adds ``scale * softmax(Q K_ip^T) V_ip``; multiplying its
    probabilities by ``w`` is diffusers' scale times ``w`` at those sites and
    steps, so ``IPWeight(0.5)`` everywhere equals ``set_ip_adapter_scale(0.5 * scale)``,
    and a step window or a site selector schedules it (``steps="0:0.5"``,
    ``selector="sites=up_blocks.*"``). Every row is weighted, as diffusers' scale is.

    Args:
        weight: one finite number for every adapter, or ``{adapter index: weight}``.
        steps: a step window (``xattn.steps``: ``0.5`` is the first half, ``"0:10"``); None: every step.
        selector: which cross sites (``res=16``, ``sites=...``).
    """

    def __init__(self, weight: float | dict[int, float], *, steps=None,
                 selector: Selector | str | dict | None = None):
        from .steps import parse_window

        weights = weight if isinstance(weight, dict) else {None: weight}
        for key, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > 1e4:
                raise HookError(f"IPWeight: the weight must be a finite number of at most 1e4, not {value!r}")
            if key is not None and (not isinstance(key, int) or key < 0):
                raise HookError(f"IPWeight: adapters are named by their index 0, 1, ..., not {key!r}")
        self.weights = {key: float(value) for key, value in weights.items()}
        self.selector = Selector.coerce(selector, kind="cross")
        if self.selector.steps is not None:
            raise HookError("IPWeight: give the step window as `steps=`, not in the selector")
        self.window = None if steps is None else parse_window(steps, what="IPWeight steps")
        self._steps: frozenset[int] | None = None

    def begin_run(self, run) -> None:
        from .steps import steps_in

        self._steps = steps_in(self.window, run.num_steps, what="IPWeight steps")

    def active(self, ctx: HookContext) -> bool:
        return self._steps is None or ctx.step in self._steps

    def points(self) -> dict[str, HookFn]:
        return {"ip_probs": self.ip_probs}

    def ip_probs(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        weight = self.weights.get(adapter_of(ctx), self.weights.get(None))
        return None if weight is None or weight == 1.0 else x * weight

    def to_dict(self) -> dict:
        from .steps import describe

        return {"ip_weight": {("all" if k is None else k): v for k, v in self.weights.items()},
                "steps": describe(self.window), "selector": str(self.selector)}

    def __repr__(self) -> str:
        return f"IPWeight({self.to_dict()})"


@dataclass(frozen=True)
class IPRecord:
    """One adapter's image-token map at one attention call: ``probs`` ``[b, h, i, n_a]`` (float32, CPU)."""

    site: str
    step: int | None
    res: tuple[int, int]
    adapter: int
    probs: torch.Tensor


class IPCapture(Controller):
    """Records each adapter's image-token maps (``ip_probs``) at the selected cross sites.

    ``records`` holds every call of the last run; :meth:`maps` averages them
    into ``[b, n_a, h, w]`` per image token (each token's share of the image
    branch's attention; the branch's softmax is its own, so the tokens sum to 1).
    """

    def __init__(self, selector: Selector | str | dict | None = None):
        self.selector = Selector.coerce(selector, kind="cross")
        self.records: list[IPRecord] = []

    def points(self) -> dict[str, HookFn]:
        return {"ip_probs": self.ip_probs}

    def reset(self) -> None:
        self.records = []

    def ip_probs(self, x: torch.Tensor, ctx: HookContext) -> None:
        self.records.append(IPRecord(ctx.site.name, ctx.step, ctx.res, adapter_of(ctx), x.detach().float().cpu()))

    def maps(self, adapter: int = 0, res: tuple[int, int] | None = None) -> torch.Tensor:
        """Mean over heads, sites and steps at ``res`` (default: the largest captured): ``[b, n_a, h, w]``."""
        mine = [r for r in self.records if r.adapter == adapter]
        if not mine:
            raise LookupError(f"no map of IP-Adapter {adapter} was captured (is one loaded, with a non-zero scale?)")
        res = res or max({r.res for r in mine}, key=lambda hw: hw[0] * hw[1])
        chosen = [r.probs.mean(1) for r in mine if r.res == tuple(res)]  # [b, i, n_a]
        if not chosen:
            raise LookupError(f"no map of IP-Adapter {adapter} at res {res}")
        mean = torch.stack(chosen).mean(0)
        return mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], *res)

    def __repr__(self) -> str:
        return f"IPCapture(selector='{self.selector}')"


__all__ = ["IPCapture", "IPHook", "IPRecord", "IPWeight", "IP_POINTS", "XattnIPAdapterProcessor", "adapter_of",
           "is_ip_processor", "projection_problem", "reproduce", "stock_classes"]

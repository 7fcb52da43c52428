"""LocalBlend: change only where the edited words are, keep every other latent pixel from the source.

prompt-to-prompt (Hertz et al. 2022, section 3.2 "local editing") builds a
mask from the cross-attention maps of chosen words in the source and target
prompts and, after each step, puts the source's latent back outside it::

    z_tgt <- z_src + mask * (z_tgt - z_src)

Here the maps are collected by a ``probs`` hook at the chosen cross-attention
sites during the step, averaged over heads and calls, resized from each
site's own map size to the latent size of the call (so any resolution and
aspect ratio works), widened by a small max-pool, divided by their maximum
and thresholded. The mask of a target is the union of the source's and the
target's word masks. Blending happens in ``on_step_end``, which the session
chains into the pipeline's ``callback_on_step_end`` by itself::

    with xattn.hooks(pipe, LocalBlend(["circle"]), Replace()):
        pipe([source, target], latents=...)

The maps are the target's *own* attention (as prompt-to-prompt stores them
before replacing): put ``LocalBlend`` before the edit controllers in ``hooks``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from ..hookpoints import BatchLayout, Controller, HookContext, Run
from ..selector import Selector, SelectorError
from ..tokens import TokenError, TokenMap
from .controllers import token_maps_of
from .errors import EditError
from .windows import WindowSpec, describe, parse_window, steps_in


BLEND_THRESHOLD = 0.3  # prompt-to-prompt's local-blend threshold (a shipped model may recommend its own)
BLEND_DILATE = 1  # latent pixels by which the mask is widened (prompt-to-prompt's max-pool of 3)
BLEND_STEPS = "0:1.0"  # blend after every step


@dataclass(frozen=True)
class _BlendPlan:
    """Rows to read and the word slots of each, built once per run."""

    rows: torch.Tensor  # [n] long: the conditional row of each (prompt, image), prompt-major
    slots: torch.Tensor  # [n, j] float: 1 on the blend words' slots of that row's prompt
    num_prompts: int
    images: int
    steps: frozenset[int]


class LocalBlend(Controller):
    """Keep the source's latent outside the aggregated maps of ``words``.

    Args:
        words: words or phrases (``"circle"``, ``"red circle"``, ``"circle#2"``)
            looked up in the source and in each target prompt. A word may be
            missing from some prompts (an added word is only in the target),
            but every target needs one of them in itself or in the source.
        threshold: a latent pixel is edited where a word map, divided by its
            maximum, exceeds this (0..1; prompt-to-prompt uses 0.3).
        steps: window of steps after which to blend (``None``: every step).
        res: which cross-attention map sizes to read (``"<=16"``, ``"16"``);
            ``None`` reads every cross-attention site.
        selector: further restricts the cross-attention sites.
        dilate: latent pixels by which to widen the mask (a max-pool of
            ``2 * dilate + 1``); 0 keeps it as thresholded.

    After a blend, :attr:`last_masks` holds the ``[n_targets * images, H, W]``
    boolean masks used, for inspection.
    """

    def __init__(self, words: str | Sequence[str], threshold: float = BLEND_THRESHOLD, *, steps: WindowSpec = BLEND_STEPS,
                 res: str | None = None, selector: Selector | str | dict | None = None, dilate: int = BLEND_DILATE):
        self.words = [words] if isinstance(words, str) else list(words)
        if not self.words or not all(isinstance(w, str) and w.strip() for w in self.words):
            raise EditError(f"LocalBlend needs one or more words, not {words!r}")
        if not 0.0 <= float(threshold) < 1.0:
            raise EditError(f"LocalBlend threshold is a fraction of the map's maximum in [0, 1), not {threshold!r}")
        self.threshold = float(threshold)
        if isinstance(dilate, bool) or not isinstance(dilate, int) or dilate < 0:
            raise EditError(f"LocalBlend dilate is a whole number of latent pixels >= 0, not {dilate!r}")
        self.dilate = dilate
        self.window = parse_window(steps, what="LocalBlend steps")
        try:
            selector = Selector.coerce(selector)
            if res is not None:
                selector = replace(selector, res=Selector.parse(f"res={res}").res)
        except SelectorError as error:
            raise EditError(f"LocalBlend: {error}") from None
        if selector.kind not in (None, "cross") or selector.steps is not None or selector.tokens is not None:
            raise EditError("LocalBlend reads cross-attention; its selector may name sites and res only")
        self.selector = replace(selector, kind="cross")
        self.reset()

    # -- protocol ----------------------------------------------------------------
    def begin_run(self, run: Run) -> None:
        """Rows, word slots and steps, once per run; forget the last run's maps."""
        self.reset()
        self._plan = self.plan(run.layout, run.num_steps)

    def reset(self) -> None:
        self._plan: _BlendPlan | None = None
        self._step: int | None = None
        self._sums: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> [n, h, w] summed maps
        self._calls = 0
        self._latent_hw: tuple[int, int] | None = None
        self.last_masks: torch.Tensor | None = None

    def active(self, ctx: HookContext) -> bool:
        return self._plan is not None and ctx.step in self._plan.steps

    def probs(self, x: torch.Tensor, ctx: HookContext) -> None:
        plan = self._plan
        if ctx.step != self._step:  # a new step: forget the last one's maps
            self._sums, self._calls, self._step = {}, 0, ctx.step
        rows = x[plan.rows.to(x.device)].float()  # [n, h, i, j]
        # words summed, heads averaged: [n, i]
        slots = plan.slots.to(x.device)
        if slots.shape[1] < x.shape[-1]:  # text columns past the prompts' slots (padding chunks): no blend word
            slots = F.pad(slots, (0, x.shape[-1] - slots.shape[1]))
        maps = torch.einsum("nhij,nj->ni", rows, slots) / rows.shape[1]
        height, width = ctx.res
        maps = maps.view(len(plan.rows), height, width)  # [n, h, w]
        total = self._sums.get(ctx.res)
        self._sums[ctx.res] = maps if total is None else total + maps
        self._calls += 1
        self._latent_hw = ctx.latent_hw  # packed latents (Flux) are unpacked to this grid to blend
        return None

    # -- per run -----------------------------------------------------------------
    def word_slots(self, token_maps: list[TokenMap]) -> list[list[int]]:
        """The blend words' slots in each prompt (a word absent from a prompt adds nothing there)."""
        per_prompt = []
        for token_map in token_maps:
            slots = []
            for word in self.words:
                try:
                    slots += token_map.indices(word)
                except TokenError:
                    pass
            per_prompt.append(sorted(set(slots)))
        for target, slots in enumerate(per_prompt[1:], start=1):
            if not per_prompt[0] and not slots:
                raise EditError(f"LocalBlend words {self.words} are neither in the source {token_maps[0].prompt!r} "
                                f"nor in the target {token_maps[target].prompt!r}")
        return per_prompt

    def plan(self, layout: BatchLayout, num_steps: int | None) -> _BlendPlan:
        """The rows to read and their word slots, for a run with this layout and step count."""
        token_maps = token_maps_of(layout)
        if len(token_maps) < 2:
            raise EditError("LocalBlend needs the source prompt and at least one target prompt in the batch")
        word_slots = self.word_slots(token_maps)
        images = layout.images_per_prompt
        rows, slots = [], []
        for prompt in range(layout.num_prompts):
            for image in range(images):
                found = layout.row_indices(cond=True, prompt=prompt, image=image)
                if not found:
                    raise EditError(f"LocalBlend found no conditional row for prompt {prompt}, image {image}")
                rows.append(found[0])
                mask = torch.zeros(max(token_map.max_length for token_map in token_maps))  # long prompts: padded
                mask[word_slots[prompt]] = 1.0
                slots.append(mask)
        return _BlendPlan(torch.tensor(rows, dtype=torch.long), torch.stack(slots), layout.num_prompts, images,
                          steps_in(self.window, num_steps, "LocalBlend steps"))

    # -- between steps -----------------------------------------------------------
    def masks(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """``[num_prompts * images, H, W]`` bool: each prompt's word mask from this step's maps."""
        if not self._sums:
            raise EditError("LocalBlend has no maps for this step: no cross-attention site matched its selector")
        height, width = latent_hw
        total = None
        for maps in self._sums.values():  # each [n, h, w], resized to the latent's [n, H, W]
            resized = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            total = resized if total is None else total + resized
        mean = total / self._calls  # [n, H, W]
        if self.dilate:
            size = 2 * self.dilate + 1
            mean = F.max_pool2d(mean[:, None], size, stride=1, padding=self.dilate)[:, 0]
        peak = mean.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
        has_words = self._plan.slots.sum(dim=1).to(mean.device) > 0  # prompts without the words add no mask
        return (mean / peak > self.threshold) & has_words[:, None, None]

    def on_step_end(self, step: int, latents: torch.Tensor) -> torch.Tensor | None:
        """Blend the targets' latents [num_prompts * images, C, H, W] (prompt-major) with the source's.

        Packed latents ``[B, n, 4 C]`` (Flux: one token per 2x2 latent patch) are unpacked to
        ``[B, C, H, W]`` on the latent grid of the step's calls, blended, and packed back.
        """
        plan = self._plan
        if plan is None or step not in plan.steps or self._step != step or not self._sums:
            return None
        if latents.shape[0] != plan.num_prompts * plan.images:
            raise EditError(f"LocalBlend expected {plan.num_prompts * plan.images} latents "
                            f"({plan.num_prompts} prompts x {plan.images} images), got {latents.shape[0]}")
        if latents.dim() == 3:
            return pack(self.on_step_end(step, unpack(latents, self._latent_hw)))
        word_masks = self.masks(tuple(latents.shape[-2:])).to(latents.device)
        word_masks = word_masks.view(plan.num_prompts, plan.images, *latents.shape[-2:])  # [p, k, H, W]
        masks = word_masks[1:] | word_masks[:1]  # union with the source's words: [p-1, k, H, W]
        grouped = latents.view(plan.num_prompts, plan.images, *latents.shape[1:])  # [p, k, C, H, W]
        source = grouped[:1]
        edited = torch.where(masks[:, :, None], grouped[1:], source)  # [p-1, k, C, H, W]; exact, no arithmetic
        blended = torch.cat([source, edited])
        self.last_masks = masks.flatten(0, 1)
        self._sums, self._calls = {}, 0
        return blended.view_as(latents)

    def to_dict(self) -> dict:
        return {"edit": "local_blend", "words": self.words, "threshold": self.threshold,
                "steps": describe(self.window), "selector": str(self.selector), "dilate": self.dilate}

    def __repr__(self) -> str:
        return f"LocalBlend({self.words!r}, threshold={self.threshold})"


def unpack(latents: torch.Tensor, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    """Packed latents ``[B, (H/2) (W/2), 4 C]`` -> ``[B, C, H, W]``, as ``FluxPipeline._unpack_latents``."""
    batch, tokens, channels = latents.shape
    if latent_hw is None or channels % 4 or latent_hw[0] % 2 or latent_hw[1] % 2 \
            or tokens != (latent_hw[0] // 2) * (latent_hw[1] // 2):
        raise EditError(f"LocalBlend cannot lay {tokens} packed tokens of {channels} channels out on the latent "
                        f"grid {latent_hw} of its maps (one token per 2x2 latent patch)")
    height, width = latent_hw
    grid = latents.view(batch, height // 2, width // 2, channels // 4, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels // 4, height, width)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2) (W/2), 4 C]``, as ``FluxPipeline._pack_latents``: inverse of :func:`unpack`."""
    batch, channels, height, width = latents.shape
    grid = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(batch, (height // 2) * (width // 2), channels * 4)


def pixel_margin(value) -> int | None:
    """``blend_pixels`` checked: ``None`` (off) or a whole number of image pixels >= 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise EditError(f"blend_pixels is a whole number of image pixels >= 0 (None: off), not {value!r}")
    return value


def composite(source, target, mask: torch.Tensor, margin: int = 0):
    """``target`` with every pixel farther than ``margin`` pixels outside ``mask`` taken from ``source``.

    ``source`` and ``target`` are PIL images of one size; ``mask`` is a latent
    ``[H, W]`` bool mask (:attr:`LocalBlend.last_masks`), each latent pixel
    standing for the block of image pixels it decodes to. Why: the latents
    outside the mask are the source's, yet the VAE decoder (its group norms and
    mid-block attention see the whole latent) lets the edited region tint
    them; taking those pixels from the source's image undoes that (the pixel
    blending of Avrahami et al. 2023, "Blended Latent Diffusion", 4.1). The
    margin leaves the decoder the edge it draws just outside the mask.
    """
    import numpy as np
    from PIL import Image

    if source.size != target.size:
        raise EditError(f"cannot composite images of sizes {source.size} and {target.size}")
    width, height = target.size
    rows, cols = mask.shape[-2:]
    if width % cols or height % rows:
        raise EditError(f"a {cols}x{rows} mask does not tile a {width}x{height} image")
    inside = mask.bool().cpu().float().repeat_interleave(height // rows, 0).repeat_interleave(width // cols, 1)
    if margin:
        inside = F.max_pool2d(inside[None, None], 2 * margin + 1, stride=1, padding=margin)[0, 0]
    keep = inside.numpy()[..., None] > 0
    return Image.fromarray(np.where(keep, np.asarray(target.convert("RGB")), np.asarray(source.convert("RGB"))))


def composite_targets(images: list, count: int, controllers, margin: int | None) -> tuple[list, bool]:
    """An edit batch's images (prompt-major, ``count`` per prompt) with each target composited over its
    source by :func:`composite` from the :class:`LocalBlend` among ``controllers``; and whether any was."""
    blender = next((c for c in controllers if isinstance(c, LocalBlend)), None)
    if margin is None or blender is None or blender.last_masks is None:
        return images, False
    # last_masks is prompt-major over the targets too: target image i was edited from source image i % count
    targets = [composite(images[i % count], image, blender.last_masks[i], margin)
               for i, image in enumerate(images[count:])]
    return images[:count] + targets, True


__all__ = ["BLEND_DILATE", "BLEND_STEPS", "BLEND_THRESHOLD", "LocalBlend", "composite", "composite_targets",
           "pixel_margin"]

"""The Guide controller: gradient steps on the latents that make attention losses smaller.

At each step of its window, before the step's denoiser call (see
:mod:`xattn.steering`), it denoises the conditional rows of the current
latents once with gradients, reads their cross-attention maps at its sites
(``res=16,8`` by default on a UNet, the patch grid on a transformer, resized to
the largest and averaged over sites and heads), turns them into per-word maps the way Attend-and-Excite does (start
token and padding dropped, x100, softmax over the words), sums its losses
per row, and moves the latents against the gradient:
``z <- z - step_size * sqrt(scale_t) * grad``, with ``scale_t`` going from 1 to
0.5 over the run (Chefer et al. 2023). At the steps in ``refine`` it denoises
and steps again, image by image, for as long as the loss it just stepped from
was above the given target (iterative refinement; the step is taken either
way, as in the paper's Algorithm 1). Everywhere else sampling runs as usual,
on the fused path.

The gradient pass stops at the last site the guide reads: the first pass of
a run counts the maps, later passes raise :class:`~xattn.steering.EnoughRead`
after that many (the layers after it cannot change the loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import NothingSelectedError
from ..hookpoints import Controller, HookContext, Run
from ..selector import Selector, SelectorError
from ..sites import one_map_size
from ..steering import EnoughRead
from ..steps import StepWindowError, WindowSpec, describe, parse_window, steps_in
from ..tokens import TokenMap
from ..validate import MAX_STEPS, OptionError, integer, number
from .losses import GuidanceError, Loss, loss_from_dict

UNET_RES = "16,8"  # Attend-and-Excite reads the 16x16 maps of SD at 512px; the shapes world's 16 and 8
AUTO_RES = "auto"  # UNET_RES on a UNet, the one patch grid on a transformer (see Guide.bind)
MAX_REFINE = 1000  # repeats of one refinement: more is a typo, and each is a denoiser pass with gradients


class Guide(Controller):
    """Guide sampling with losses on attention maps.

    Args:
        *losses: :class:`Excite`, :class:`Bind`, :class:`Layout`, :class:`Focus` (they add up, each with its
            weight).
        steps: window of steps to guide (``0.5``: the first half, as Attend-and-Excite's 25 of 50).
        step_size: the gradient step's scale (Attend-and-Excite: 20).
        refine: ``{step: target loss}``: at those steps, repeat until the loss is at most the target.
        max_refine: the most repeats of one refinement.
        res: which map sizes to read (a selector ``res``: ``"16,8"``); the default ``"auto"`` reads
            16 and 8 on a UNet (Attend-and-Excite's choice) and the one patch grid on a transformer.
        selector: further restricts the cross-attention sites.

    Example::

        with xattn.hooks(pipe, Guide(Bind({"red": "circle", "blue": "square"}))):
            pipe("a red circle and a blue square")
    """

    def __init__(self, *losses: Loss, steps: WindowSpec = 0.5, step_size: float = 20.0,
                 refine: Mapping[int, float] | None = None, max_refine: int = 20, res: str | None = AUTO_RES,
                 selector: Selector | str | dict | None = None):
        if not losses or not all(isinstance(loss, Loss) for loss in losses):
            raise GuidanceError(f"Guide needs one or more losses (Excite, Bind, Layout), not {losses!r}")
        self.losses = list(losses)
        try:
            self.window = parse_window(steps, what="Guide steps") or ()
            chosen = Selector.coerce(selector)
            self._auto_res = res == AUTO_RES and chosen.res is None
            if res is not None:
                chosen = replace(chosen, res=Selector.parse(f"res={UNET_RES if res == AUTO_RES else res}").res)
        except (StepWindowError, SelectorError) as error:
            raise GuidanceError(f"Guide: {error}") from None
        if chosen.kind not in (None, "cross") or chosen.steps is not None:
            raise GuidanceError("Guide reads cross-attention; give steps as `steps=`, sites and res in the selector")
        self.selector = replace(chosen, kind="cross")
        self.step_size = _checked_step_size(step_size)
        self.max_refine = _checked_whole(max_refine, "Guide max_refine", 0, MAX_REFINE)
        self.refine = _checked_refine(refine, self.losses)
        self.reset()

    # -- lifecycle -------------------------------------------------------------------
    def bind(self, session) -> None:
        """With ``res="auto"``, read every map size where all sites share one (a transformer's patch grid)."""
        if self._auto_res:
            unet_sizes = Selector.parse(f"res={UNET_RES}").res
            self.selector = replace(self.selector, res=None if one_map_size(session.model) else unet_sizes)

    def reset(self) -> None:
        self._steps: frozenset[int] = frozenset()
        self._num_steps = 1
        self._collecting = False
        self._sums: dict = {}
        self._reads = 0  # maps read in the current pass
        self._reads_per_pass: int | None = None  # counted by the run's first whole pass; later passes stop there
        self._slots: dict[int, _Slots] = {}  # prompt index -> its words' slots, resolved once per run
        self._state: dict[tuple[int, int], dict] = {}  # (row, loss) -> a stateful loss's memory, for one run
        self.losses_seen: list[tuple[int, float]] = []  # (step, loss) before each update, for inspection

    def begin_run(self, run: Run) -> None:
        """Find the guided steps of this run and resolve every word to its slots, once per pipeline call.

        Unknown words raise :class:`~xattn.TokenError` here, before the first step.
        """
        self.reset()
        self._steps = self.guided_steps(run.num_steps)
        self.check_refine(run.num_steps)
        self._num_steps = run.num_steps or 1 + max(self._steps, default=0)
        words = self._words()
        for prompt, token_map in enumerate(run.layout.token_maps):
            if token_map is not None:
                self._slots[prompt] = _Slots.of(token_map, words)

    def guided_steps(self, num_steps: int | None) -> frozenset[int]:
        """The steps of a ``num_steps``-step run this guide steers (empty: it would do nothing)."""
        return steps_in(self.window, num_steps, what="Guide steps") if self.window else frozenset()

    def check_run(self, num_steps: int, window: str, where: str = "run",
                  example: str = "0:N with N <= --steps") -> None:
        """Before sampling: refuse a window that holds no step of a ``num_steps``-step ``where`` (the guidance
        would be recorded yet change nothing), named as the user gave it (``window``), and refinement outside it.
        """
        if not self.guided_steps(num_steps):
            raise NothingSelectedError(f"{window} {describe(self.window)} holds no step of this {num_steps}-step "
                                       f"{where}, so the guidance would do nothing; give a window inside the run "
                                       f"(0.5: the first half, or {example})")
        self.check_refine(num_steps)

    def check_refine(self, num_steps: int | None) -> None:
        """Refuse refinement at steps this run does not guide: it would be recorded yet never run."""
        if not self.refine or num_steps is None:
            return
        outside = sorted(set(self.refine) - self.guided_steps(num_steps))
        if outside:
            raise GuidanceError(f"Guide refine steps {outside} lie outside the steps it guides in this "
                                f"{num_steps}-step run (window {describe(self.window)}): they would never refine; "
                                "give steps inside the window")

    def active(self, ctx: HookContext) -> bool:
        return self._collecting

    def probs(self, x: torch.Tensor, ctx: HookContext) -> None:
        maps = x.mean(dim=1)  # [n, i, j]: heads averaged, gradients kept
        height, width = ctx.res
        maps = maps.view(maps.shape[0], height, width, maps.shape[-1])  # [n, h, w, j]
        total, count = self._sums.get(ctx.res, (0.0, 0))
        self._sums[ctx.res] = (total + maps, count + 1)
        self._reads += 1
        if self._reads == self._reads_per_pass:
            raise EnoughRead  # the rest of the denoiser cannot change what the loss reads
        return None

    # -- steering ------------------------------------------------------------------------
    def before_step(self, steer):
        """Attend-and-Excite's Algorithm 1, per image: denoise, take a gradient step, and at a refinement step
        go back to denoising while the loss *before* that step was above the target."""
        if steer.step not in self._steps:
            return None
        latents = steer.latents
        target = self.refine.get(steer.step)
        moving = None  # images denoised again at the next pass (None: all of them)
        for attempt in range(1 + (self.max_refine if target is not None else 0)):
            z = latents.detach().clone().requires_grad_(True)
            rows = None if moving is None else [r for r, still in enumerate(moving.tolist()) if still]
            per_row = self._loss(steer, z, rows)  # [n]: each image's own loss (0 for images not denoised again)
            value = float(per_row.detach().sum())
            if not math.isfinite(value):
                raise GuidanceError(f"Guide: the guidance loss is {value} at step {steer.step}"
                                    f"{f' (refinement {attempt})' if attempt else ''}; the latents are left "
                                    "as they were. Lower step_size or the losses' weights, or guide fewer steps")
            self.losses_seen.append((steer.step, value))
            chosen = per_row if moving is None else per_row * moving  # every image denoised in this pass moves
            (grad,) = torch.autograd.grad(chosen.sum(), z)  # rows are independent: row i moves on its own loss
            if not bool(torch.isfinite(grad).all()):
                raise GuidanceError(f"Guide: the guidance loss's gradient is not finite at step {steer.step}; "
                                    "the latents are left as they were")
            scale = 1.0 - 0.5 * steer.step / max(self._num_steps - 1, 1)  # 1 -> 0.5 over the run
            latents = (z - self.step_size * scale ** 0.5 * grad).detach()
            if not bool(torch.isfinite(latents).all()):
                raise GuidanceError(f"Guide: a guidance step of size {self.step_size} made the latents "
                                    f"non-finite at step {steer.step}; lower step_size")
            if target is None:
                break
            above = per_row.detach() > target  # an image whose loss reached the target is done after this step
            moving = above if moving is None else moving & above
            if not bool(moving.any()):
                break
        return latents

    def _loss(self, steer, z: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Each conditional row's guidance loss, ``[n]``, with its graph back to ``z``.

        ``rows``: denoise only these rows (a refinement's images still above
        their target); the others' losses are 0, without a graph, so they do not move.
        """
        self._sums, self._reads, self._collecting = {}, 0, True
        try:
            out = steer.denoise(z) if rows is None else steer.denoise(z, rows)
        finally:
            self._collecting = False
        if out is not None and self._reads:  # a whole pass: from now on, stop after its last map
            self._reads_per_pass = self._reads
        if not self._sums:
            raise GuidanceError(f"Guide read no cross-attention map: its selector '{self.selector}' matched no "
                                "site at this latent size")
        text = self._text_maps()  # [len(rows), H, W, j]
        losses = [z.new_zeros(())] * steer.layout.batch_size
        for position, row in enumerate(range(steer.layout.batch_size) if rows is None else rows):
            word_maps = self._slots_of(steer, steer.layout.rows[row].prompt).word_maps(text[position])
            losses[row] = sum(loss.weight * (loss(word_maps, self._state.setdefault((row, index), {}))
                                             if getattr(loss, "stateful", False) else loss(word_maps))
                              for index, loss in enumerate(self.losses))
        return torch.stack(losses)

    def _slots_of(self, steer, prompt: int) -> "_Slots":
        """The slots ``begin_run`` resolved for ``prompt``; resolved again only if this call's token map differs."""
        token_map = steer.layout.token_map(prompt)  # names the problem when the rows' prompts are unknown
        slots = self._slots.get(prompt)
        if slots is None or slots.token_map is not token_map:
            slots = self._slots[prompt] = _Slots.of(token_map, self._words())
        return slots

    def _words(self) -> list[str]:
        return list(dict.fromkeys(w for loss in self.losses for w in loss.words()))

    def _text_maps(self) -> torch.Tensor:
        """Sites' maps resized to the largest and averaged: ``[n, H, W, j]``."""
        size = max(self._sums, key=lambda hw: hw[0] * hw[1])
        total, calls = 0.0, 0
        for (maps, count) in self._sums.values():
            resized = F.interpolate(maps.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
            total, calls = total + resized, calls + count
        return (total / calls).permute(0, 2, 3, 1)

    def to_dict(self) -> dict:
        return {"guide": [loss.to_dict() for loss in self.losses], "steps": describe(self.window),
                "step_size": self.step_size, "refine": {str(k): v for k, v in self.refine.items()},
                "max_refine": self.max_refine, "selector": str(self.selector)}

    @classmethod
    def from_dict(cls, record: Mapping) -> "Guide":
        selector = Selector.parse(record["selector"]) if record.get("selector") else None
        return cls(*[loss_from_dict(item) for item in record["guide"]], steps=record.get("steps"),
                   step_size=record.get("step_size", 20.0),
                   refine={int(k): v for k, v in (record.get("refine") or {}).items()},
                   max_refine=record.get("max_refine", 20), res=None, selector=selector)

    def __repr__(self) -> str:
        return f"Guide({', '.join(type(loss).__name__ for loss in self.losses)}, steps={describe(self.window)!r})"


@dataclass(frozen=True)
class _Slots:
    """One prompt's words resolved to slots: the start of the prompt's words, its end slot, each word's slots."""

    token_map: TokenMap
    first: int  # slots before the first word: 1 for CLIP's start token, 0 for T5
    end: int
    words: dict[str, list[int]]  # word -> its slots, counted from ``first``

    @classmethod
    def of(cls, token_map: TokenMap, words: list[str]) -> "_Slots":
        first = getattr(token_map, "start_slots", 1)
        return cls(token_map, first, token_map.end_slot,
                   {word: [slot - first for slot in token_map.indices(word)] for word in words})

    def word_maps(self, maps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-word ``[H, W]`` maps of one row: words' slots over the prompt's words only, softmax(100 x)."""
        text = maps[..., self.first:self.end] * 100.0  # [H, W, words]: no start token, no padding
        text = text.softmax(dim=-1)
        return {word: text[..., slots].mean(dim=-1) for word, slots in self.words.items()}


def _checked_step_size(step_size) -> float:
    try:
        value = number(step_size, "Guide step_size")
    except OptionError as error:
        raise GuidanceError(str(error)) from None
    if not 0 < value < 1e6:
        raise GuidanceError(f"Guide step_size must be a positive finite number below 1e6, not {step_size!r}")
    return value


def _checked_whole(value, name: str, low: int, high: int) -> int:
    try:
        return integer(value, name, low=low, high=high)
    except OptionError as error:
        raise GuidanceError(str(error)) from None


def _checked_refine(refine, losses: list[Loss]) -> dict[int, float]:
    """``{step: target}`` with whole steps and finite targets the losses can reach."""
    if refine is None:
        return {}
    if not isinstance(refine, Mapping):
        raise GuidanceError(f"Guide refine must be a mapping {{step: target loss}}, not {refine!r}")
    floor = sum(loss.weight * loss.lower_bound for loss in losses)  # -inf when a loss has no floor
    checked = {}
    for step, target in refine.items():
        step = _checked_whole(step, "Guide refine step", 0, MAX_STEPS - 1)
        try:
            target = number(target, f"Guide refine target at step {step}")
        except OptionError as error:
            raise GuidanceError(str(error)) from None
        if target < floor:
            raise GuidanceError(f"Guide refine target at step {step} is {target!r}, below {floor!r}, the smallest "
                                f"loss {', '.join(type(loss).__name__ for loss in losses)} can reach: refinement "
                                "would run all max_refine repeats for nothing")
        checked[step] = target
    return checked


__all__ = ["Guide"]

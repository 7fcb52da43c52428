"""The Reweight controller: give words of the prompt a weight at the attention level.

Words are resolved to token slots once per batch layout (i.e. once per
pipeline call), the step window once per run, and the ``[b, j]`` weight
tensor once per step; the per-layer work is one ``x * w`` or ``x + log w`` on
a ``[b, 77]`` tensor, at the fused hook points, so attention keeps SDPA's
speed and the map is never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from ..hookpoints import BatchLayout, Controller, HookContext, Run
from ..prompt_syntax import WeightedSpan, parse_prompt
from ..selector import Selector
from ..steps import contains
from ..tokens import TokenMap
from .modes import ReweightError, check_weight, emphasise, mode_named
from .schedule import Ramp, WeightValue, parse_window, resolve_window, weight_at

ROWS = ("cond", "all")


@dataclass(frozen=True)
class _Target:
    """Token slots of one batch row that carry one weight."""

    row: int
    slots: tuple[int, ...]
    value: WeightValue
    name: str  # the word or span, for error messages


class Reweight(Controller):
    """Weight words of the prompt by ``mode`` (see :mod:`xattn.reweight.modes`).

    Args:
        weights: word -> weight. Keys are words (``"red"``: every occurrence),
            ``"red#2"`` (the 2nd occurrence), phrases (``"red circle"``) or token
            slot indices (``5``), as :class:`xattn.TokenMap` reads them. Values are
            numbers or :class:`Ramp`. Later keys win where two keys share a slot.
        mode: ``"scale"`` (default), ``"bias"`` or ``"embedding"``.
        steps: the step window: indices ``"2:10"``, fractions ``"0:0.3"``, a
            tuple ``(0, 0.3)``, or ``None`` for every step.
        selector: which cross-attention sites (e.g. ``"res=16"``); steps may
            be given here instead of ``steps``. Always ``kind=cross``.
        rows: ``"cond"`` (default) weights the conditional rows only; the
            unconditional rows of classifier-free guidance keep weight 1.
            ``"all"`` weights both.
        prompt_index: weight only the rows of this prompt of a batched call.

    Unknown words raise :class:`xattn.TokenError` at the first UNet call of a
    run (before the first step completes), naming the word and listing the
    prompt's words. Weights that are not finite, or ``<= 0`` in bias mode,
    raise :class:`ReweightError` here.

    Example::

        with xattn.hooks(pipe, xattn.Reweight({"red": 0.5}, mode="bias", steps="0:0.5")):
            pipe("a red circle and a blue square")
    """

    def __init__(self, weights: Mapping[str | int, float | Ramp] | None = None, mode: str = "scale",
                 steps: object = None, selector: Selector | str | dict | None = None,
                 rows: str = "cond", prompt_index: int | None = None):
        self.mode = mode_named(mode)
        self.weights: dict[str | int, WeightValue] = {
            key: _checked_value(self.mode, _checked_key(key), value) for key, value in (weights or {}).items()
        }
        self.spans: tuple[WeightedSpan, ...] = ()  # from a weighted prompt (see from_prompt)
        self.prompt: str | None = None  # the clean prompt those spans belong to
        selector = Selector.coerce(selector)
        if selector.kind not in (None, "cross"):
            raise ReweightError(f"Reweight acts on cross-attention (text tokens); the selector asks kind={selector.kind}")
        if selector.tokens is not None:
            raise ReweightError("give the words to reweight as `weights`, not as selector tokens")
        if steps is not None and selector.steps is not None:
            raise ReweightError("give the step window once: either `steps=` or steps= in the selector")
        self.window = parse_window(steps) if steps is not None else selector.steps
        self.selector = replace(selector, kind="cross", steps=None)
        if rows not in ROWS:
            raise ReweightError(f"rows must be one of {', '.join(ROWS)}, not {rows!r}")
        self.rows = rows
        if prompt_index is not None and (not isinstance(prompt_index, int) or prompt_index < 0):
            raise ReweightError(f"prompt_index must be an integer >= 0, not {prompt_index!r}")
        self.prompt_index = prompt_index
        self.reset()

    @classmethod
    def from_prompt(cls, text: str, mode: str = "scale", weights: Mapping[str | int, float | Ramp] | None = None,
                    syntax: str = "a1111", strict: bool = False, **options) -> "Reweight":
        """Build from a weighted prompt such as ``"a (red:2) circle and a [blue] square"``.

        Pass :attr:`prompt` (the clean text) to the pipeline. ``weights`` add
        to or override the prompt's own weights; ``syntax`` (``"a1111"`` or
        ``"compel"``) and ``strict`` are those of :func:`xattn.prompts.parse_prompt`;
        ``options`` are those of :class:`Reweight`. Raises
        :class:`xattn.prompts.PromptSyntaxError` for a prompt the dialect cannot read.
        """
        parsed = parse_prompt(text, syntax=syntax, strict=strict)
        controller = cls(weights, mode=mode, **options)
        for span in parsed.spans:
            check_weight(controller.mode, span.text, span.weight)
        controller.spans = tuple(parsed.spans)
        controller.prompt = parsed.text
        return controller

    # -- controller protocol ---------------------------------------------------
    def points(self):
        return {self.mode.point: self._apply}

    def begin_run(self, run: Run) -> None:
        """Resolve words to slots for every weighted row, once per run (unknown words raise here)."""
        if self.window is not None and run.num_steps is None and any(span.fractional for span in self.window):
            raise ReweightError("a fractional step window (e.g. 0:0.3) needs the number of steps; run it through "
                                "a pipeline, or pass `scheduler=` to xattn.hooks(...)")
        self._targets = self._resolve(run.layout)
        self._by_layout = {id(run.layout): (run.layout, self._targets)}
        self._tensors = {}

    def reset(self) -> None:
        self._targets: list[_Target] = []
        self._by_layout: dict[int, tuple[BatchLayout, list[_Target]]] = {}  # other rows in one run (a ControlNet)
        self._tensors: dict[tuple, torch.Tensor] = {}

    def active(self, ctx: HookContext) -> bool:
        if not self._targets:
            return False
        if self.window is not None and ctx.step is None:
            raise ReweightError("a step window needs a step clock; this call has no timestep")
        return contains(self.window, ctx.step, ctx.num_steps)

    def _apply(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        weights = self._weight_tensor(ctx, x.shape[1], x.dtype, x.device)  # [b, j]
        if self.mode.name == "scale":
            return x * weights
        if self.mode.name == "bias":
            return x + weights  # already log w
        return emphasise(x, weights)

    # -- resolution, once per layout / run / step ------------------------------
    def _resolve(self, layout: BatchLayout) -> list[_Target]:
        """Words -> slots for every row this controller weights."""
        if self.prompt_index is not None and self.prompt_index >= max(layout.num_prompts, 1):
            raise ReweightError(f"prompt_index={self.prompt_index}, but the call has {layout.num_prompts} prompt(s)")
        rows = layout.row_indices(cond=True if self.rows == "cond" else None, prompt=self.prompt_index)
        targets: list[_Target] = []
        for row in rows:
            prompt = layout.rows[row].prompt
            for span in self.spans:
                slots = self._token_map(layout, prompt).span_indices(span.start, span.end)
                targets.append(_Target(row, tuple(slots), span.weight, span.text))
            for key, value in self.weights.items():
                slots = [key] if isinstance(key, int) else self._token_map(layout, prompt).indices(key)
                targets.append(_Target(row, tuple(slots), value, str(key)))
        return targets

    def _targets_of(self, layout: BatchLayout) -> list[_Target]:
        """The run's targets, or those of a call with other rows (a ControlNet in guess mode: cond rows only)."""
        if id(layout) not in self._by_layout:
            self._by_layout[id(layout)] = (layout, self._resolve(layout))
        return self._by_layout[id(layout)][1]

    def _token_map(self, layout: BatchLayout, prompt: int) -> TokenMap:
        token_map = layout.token_map(prompt)
        if self.spans and token_map.prompt != self.prompt:
            raise ReweightError(f"this Reweight was built from a weighted prompt whose clean text is {self.prompt!r}, "
                                f"but the pipeline got {token_map.prompt!r}; pass `reweight.prompt` to the pipeline")
        return token_map

    def _weight_tensor(self, ctx: HookContext, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (id(ctx.layout), ctx.step, ctx.num_steps, length, dtype, device)
        tensor = self._tensors.get(key)
        if tensor is None:
            window_steps = resolve_window(self.window, ctx.num_steps, ctx.step)
            weights = torch.ones(ctx.layout.batch_size, length, dtype=torch.float64)
            for target in self._targets_of(ctx.layout):
                value = weight_at(target.value, ctx.step, window_steps, ctx.num_steps)
                for slot in target.slots:
                    if not 0 <= slot < length:
                        raise ReweightError(f"token index {slot} of {target.name!r} is outside 0..{length - 1}")
                    weights[target.row, slot] = value
            if self.mode.name == "bias":
                weights = weights.log()
            tensor = self._tensors[key] = weights.to(dtype=dtype, device=device)
        return tensor

    # -- description -----------------------------------------------------------
    def to_dict(self) -> dict:
        """What this controller does, for manifests and PNG metadata."""
        def plain(value):
            return {"ramp": [value.start, value.end]} if isinstance(value, Ramp) else value
        weights = {span.text: span.weight for span in self.spans}
        weights.update({str(key): plain(value) for key, value in self.weights.items()})
        return {
            "mode": self.mode.name,
            "meaning": self.mode.meaning,
            "weights": weights,
            "prompt": self.prompt,
            "steps": None if self.window is None else ",".join(str(span) for span in self.window),
            "selector": str(self.selector),
            "rows": self.rows,
            "prompt_index": self.prompt_index,
        }

    @classmethod
    def from_dict(cls, record: dict) -> "Reweight":
        """The controller a :meth:`to_dict` record describes (PNG metadata, manifests)."""
        def key(name: str):
            return int(name) if name.isdigit() else name  # token slots are stored as text

        def value(weight):
            return Ramp(*weight["ramp"]) if isinstance(weight, dict) else weight

        weights = {key(name): value(weight) for name, weight in record["weights"].items()}
        return cls(weights, mode=record["mode"], steps=record.get("steps"), selector=record.get("selector"),
                   rows=record.get("rows", "cond"), prompt_index=record.get("prompt_index"))

    def __repr__(self) -> str:
        described = self.to_dict()
        return f"Reweight({described['weights']!r}, mode={self.mode.name!r}, steps={described['steps']!r})"


def _checked_key(key: object) -> str | int:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ReweightError(f"weight key {key!r} must be a word, a phrase or a token index")
    if isinstance(key, int) and key < 0:
        raise ReweightError(f"token index {key} must be >= 0")
    return key


def _checked_value(mode, key: str | int, value: object) -> WeightValue:
    if isinstance(value, Ramp):
        return value.checked(mode, str(key))
    return check_weight(mode, str(key), value)

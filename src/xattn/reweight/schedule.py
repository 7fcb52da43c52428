"""When a weight applies: a window of steps, and weights that ramp across it.

The window is resolved to step indices once per run (``resolve_window``), so
per-layer code only asks "is this step in the set".
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import steps
from ..steps import StepWindowError, Window, WindowSpec
from .modes import Mode, ReweightError, check_weight


@dataclass(frozen=True)
class Ramp:
    """A weight that moves linearly from ``start`` at the window's first step to ``end`` at its last.

    Args:
        start: weight at the first step of the window.
        end: weight at the last step of the window.

    Example: ``Reweight({"red": Ramp(1.0, 2.0)}, steps="0:0.5")``.
    """

    start: float
    end: float

    def at(self, fraction: float) -> float:
        """Weight at ``fraction`` (0..1) of the way through the window."""
        return self.start + (self.end - self.start) * fraction

    def checked(self, mode: Mode, name: str) -> "Ramp":
        # A linear ramp between two allowed weights stays allowed (all three modes accept an interval).
        return Ramp(check_weight(mode, f"{name} (ramp start)", self.start),
                    check_weight(mode, f"{name} (ramp end)", self.end))


WeightValue = float | Ramp


def parse_window(spec: WindowSpec) -> Window | None:
    """Any step-window spelling (:mod:`xattn.steps`) -> spans; ``None`` -> every step."""
    try:
        return steps.parse_window(spec)
    except StepWindowError as error:
        raise ReweightError(str(error)) from None


def resolve_window(window: Window | None, num_steps: int | None, step: int | None) -> list[int] | None:
    """The step indices of a run with ``num_steps`` steps that the window covers (``None``: all)."""
    if window is None:
        return None
    if num_steps is None:
        num_steps = _horizon(window, step)
    try:
        return sorted(steps.steps_in(window, num_steps))
    except StepWindowError as error:
        raise ReweightError(str(error)) from None


def _horizon(window: Window, step: int | None) -> int | None:
    """Without a step count: far enough to cover the window's bounded ends and ``step``."""
    if any(span.fractional for span in window):
        return None
    return max([int(span.stop) for span in window if span.stop is not None] + [(step or 0) + 1])


def weight_at(value: WeightValue, step: int, window_steps: list[int] | None, num_steps: int | None) -> float:
    """A constant weight, or a ramp's value at ``step`` of the window."""
    if not isinstance(value, Ramp):
        return value
    covered = window_steps if window_steps is not None else (list(range(num_steps)) if num_steps else None)
    if not covered:
        raise ReweightError("a Ramp needs the number of steps: run it through a pipeline, or pass "
                            "`scheduler=` to xattn.hooks(...)")
    position = covered.index(step)
    fraction = position / (len(covered) - 1) if len(covered) > 1 else 0.0
    return value.at(fraction)


__all__ = ["Ramp", "WeightValue", "parse_window", "resolve_window", "weight_at"]

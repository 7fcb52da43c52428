"""When a weight applies: a window of steps, and weights that ramp across it.

The window is resolved to step indices once per run (``resolve_window``), so
per-layer code only asks "is this step in the set".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..selector import Selector, Span
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


def parse_window(steps: object) -> tuple[Span, ...] | None:
    """``"0:0.3"``, ``"2:10"``, ``(0, 0.3)`` or a list of such -> spans; ``None`` -> every step."""
    if steps is None:
        return None
    if isinstance(steps, tuple) and len(steps) == 2 and all(isinstance(v, (int, float, type(None))) for v in steps):
        steps = ":".join("" if v is None else repr(v) for v in steps)
    return Selector.from_dict({"steps": steps}).steps


def resolve_window(window: tuple[Span, ...] | None, num_steps: int | None, step: int | None) -> list[int] | None:
    """The step indices of a run with ``num_steps`` steps that the window covers (``None``: all)."""
    if window is None:
        return None
    if num_steps is None:
        if any(span.fractional for span in window):
            raise ReweightError("a fractional step window (e.g. 0:0.3) needs the number of steps; run it through "
                                "a pipeline, or pass `scheduler=` to xattn.hooks(...)")
        last = max([int(span.stop) for span in window if span.stop is not None] + [(step or 0) + 1])
        return [s for s in range(last) if any(span.contains(s) for span in window)]
    return [s for s in range(num_steps) if any(span.contains(s, num_steps) for span in window)]


def weight_at(value: WeightValue, step: int, window_steps: list[int] | None, num_steps: int | None) -> float:
    """A constant weight, or a ramp's value at ``step`` of the window."""
    if not isinstance(value, Ramp):
        return value
    steps = window_steps if window_steps is not None else (list(range(num_steps)) if num_steps else None)
    if not steps:
        raise ReweightError("a Ramp needs the number of steps: run it through a pipeline, or pass "
                            "`scheduler=` to xattn.hooks(...)")
    position = steps.index(step)
    fraction = position / (len(steps) - 1) if len(steps) > 1 else 0.0
    return value.at(fraction)


__all__ = ["Ramp", "WeightValue", "parse_window", "resolve_window", "weight_at"]

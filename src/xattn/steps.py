"""Step windows: one type and one syntax for "when" in every controller.

A window is a tuple of :class:`Span` s. The same text means the same steps to
a selector, :class:`~xattn.Reweight`, :class:`~xattn.Capture` and the
prompt-to-prompt controllers::

    "3"        step 3 alone                 "2:10"   steps 2..9 (half-open)
    "0:0.8"    the first 80% of the steps   "5:"     step 5 to the end
    0.8 "0.8"  short for "0:0.8" (prompt-to-prompt's ``cross_replace_steps``);
               a bare Python number is always such a fraction (1: all, 0: none)
    (0, 0.8)   a (start, stop) pair         "0:3,8:" several spans

Step ``i`` of ``N`` sits at ``i / N``. Windows become sets of step indices
once ``N`` is known (:func:`steps_in`), never by counting layer calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from .errors import XattnError

WindowSpec = Union[str, float, int, tuple, list, None]


class StepWindowError(XattnError, ValueError):
    """A step window that cannot be read, or that needs a step count it does not have."""


@dataclass(frozen=True)
class Span:
    """A half-open range ``[start, stop)``; ``None`` ends are open.

    ``fractional`` spans are fractions of the schedule, in [0, 1].
    """

    start: float | None = None
    stop: float | None = None
    fractional: bool = False

    def __post_init__(self) -> None:
        for end in (self.start, self.stop):
            if end is None:
                continue
            if not math.isfinite(end) or end < 0:
                raise StepWindowError(f"range end {end!r} must be a finite number >= 0")
            if self.fractional and end > 1:
                raise StepWindowError(f"fraction {end!r} is outside 0..1 (use integers for step indices)")
            if not self.fractional and end != int(end):
                raise StepWindowError(f"index {end!r} must be an integer")
        if self.start is not None and self.stop is not None and self.stop < self.start:
            raise StepWindowError(f"range {self} ends before it starts")

    def contains(self, index: int, total: int | None = None) -> bool:
        if self.fractional and total is None:
            raise StepWindowError(f"fractional range {self} needs the number of steps")
        position = index / total if self.fractional else index
        if self.start is not None and position < self.start:
            return False
        if self.stop is not None:
            # A fractional range that ends at 1.0 includes the last step.
            if position >= self.stop and not (self.fractional and self.stop >= 1.0):
                return False
        return True

    def __str__(self) -> str:
        def fmt(end):
            if end is None:
                return ""
            return repr(float(end)) if self.fractional else str(int(end))

        if not self.fractional and self.start is not None and self.stop == self.start + 1:
            return str(int(self.start))
        return f"{fmt(self.start)}:{fmt(self.stop)}"


Window = tuple[Span, ...]


def _number(text: str, what: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise StepWindowError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise StepWindowError(f"{what}: {text!r} is not a finite number")
    return number


def parse_span(text: str, *, what: str = "steps", allow_fraction: bool = True) -> Span:
    """One item: ``"3"``, ``"0.8"`` (= ``"0:0.8"``), ``"2:10"``, ``"0:0.8"``, ``"5:"``."""
    text = text.strip()
    if ":" not in text:
        if "." in text or "e" in text.lower():
            if not allow_fraction:
                raise StepWindowError(f"{what}: {text!r} must be an integer index")
            fraction = _number(text, what)
            if not 0.0 <= fraction <= 1.0:
                raise StepWindowError(f"{what}: a single number with a point is a fraction of the schedule in "
                                      f"0..1 (0.8 = '0:0.8'), not {text!r}; write '0:20' for step indices")
            return Span(0.0, fraction, True)
        index = _number(text, what)
        return Span(index, index + 1)
    if text.count(":") > 1:
        raise StepWindowError(f"{what}: range {text!r} has more than one ':'")
    start_text, stop_text = (part.strip() for part in text.split(":"))
    fractional = "." in text
    if fractional and not allow_fraction:
        raise StepWindowError(f"{what}: {text!r} must use integer indices")
    start = _number(start_text, what) if start_text else None
    stop = _number(stop_text, what) if stop_text else None
    return Span(start, stop, fractional)


def parse_window(spec: WindowSpec, *, what: str = "steps") -> Window | None:
    """Any window spelling (see the module docstring) -> spans; ``None`` stays ``None`` ("not given").

    What ``None`` means is the caller's default, defined once by each
    controller (every step for a selector or a Reweight, prompt-to-prompt's
    0.8 for a Replace).
    """
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise StepWindowError(f"{what}: {spec!r} is not a step window; write e.g. '0:0.8' or '0:20'")
    if isinstance(spec, Span):
        return (spec,)
    if isinstance(spec, tuple) and len(spec) == 2 and all(v is None or _is_number(v) for v in spec):
        spec = ":".join("" if v is None else repr(v) for v in spec)
    if _is_number(spec):  # a bare Python number is always a fraction: 0.8, 1 (all), 0 (none)
        if not (math.isfinite(spec) and 0.0 <= spec <= 1.0):
            raise StepWindowError(f"{what}: a bare number is a fraction of the schedule in 0..1 (0.8 = '0:0.8'), "
                                  f"not {spec!r}; write '3' or '2:10' for step indices")
        return (Span(0.0, float(spec), True),)
    if isinstance(spec, (list, tuple)):
        spans: list[Span] = []
        for item in spec:
            spans += parse_window(item, what=what) or ()
        return tuple(spans)
    if not isinstance(spec, str):
        raise StepWindowError(f"{what}: expected a window such as '0:0.8', 0.8 or (0, 20), not {type(spec).__name__}")
    items = [item.strip() for item in spec.split(",")]
    if any(not item for item in items):
        raise StepWindowError(f"{what}: empty item in {spec!r}")
    return tuple(parse_span(item, what=what) for item in items)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def contains(window: Window | None, step: int | None, num_steps: int | None) -> bool:
    """Is ``step`` in the window? ``None`` window: every step. A step-less call is in no bounded window."""
    if window is None:
        return True
    if step is None:
        return False
    return any(span.contains(step, num_steps) for span in window)


def steps_in(window: Window | None, num_steps: int | None, *, what: str = "steps") -> frozenset[int] | None:
    """The step indices of an ``num_steps``-step run that ``window`` covers (``None``: every step)."""
    if window is None:
        return None
    if num_steps is None:
        if any(span.fractional for span in window):
            raise StepWindowError(f"{what}: a fractional window needs the number of steps; run it through a "
                                  "pipeline, or pass `scheduler=` to xattn.hooks(...)")
        if any(span.stop is None for span in window):
            raise StepWindowError(f"{what}: an open-ended window needs the number of steps")
        num_steps = max(int(span.stop) for span in window)
    return frozenset(s for s in range(num_steps) if any(span.contains(s, num_steps) for span in window))


def describe(window: Window | None) -> str | None:
    """The window as text for manifests (``None``: not given)."""
    return None if window is None else ",".join(str(span) for span in window)


__all__ = ["Span", "StepWindowError", "Window", "WindowSpec", "contains", "describe", "parse_span",
           "parse_window", "steps_in"]

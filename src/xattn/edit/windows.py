"""Step windows of an edit: when a replacement applies, resolved once per run.

prompt-to-prompt (Hertz et al. 2022) injects the source maps only in the
first part of sampling (``cross_replace_steps=0.8``) and lets the target
prompt finish the details, and allows a different window per word. A window
is written as everywhere in xattn (:mod:`xattn.steps`): step indices
``"0:20"``, fractions ``"0:0.8"``, ``0.8`` (short for ``0:0.8``), a pair
``(0, 0.8)``; for an edit, ``None`` means no step at all.
Windows are turned into sets of step indices once ``N`` is known, never by
counting layer calls.
"""

from __future__ import annotations

from typing import Mapping

from .. import steps
from ..steps import Span, StepWindowError, WindowSpec, describe
from .errors import EditError

DEFAULT_KEY = "default"
CROSS_STEPS = 0.8  # prompt-to-prompt's cross_replace_steps: the target takes the source's maps for 80% of steps
SELF_STEPS = 0.4  # prompt-to-prompt's self_replace_steps


def parse_window(spec: WindowSpec, *, what: str) -> tuple[Span, ...]:
    """A window spec (:mod:`xattn.steps`) -> spans; ``None`` is the empty window (no step).

    Args:
        spec: see the module docstring.
        what: the option's name, for error messages (``"cross_steps"``).
    """
    try:
        return steps.parse_window(spec, what=what) or ()
    except StepWindowError as error:
        raise EditError(str(error)) from None


def parse_word_windows(spec: WindowSpec | Mapping[str, WindowSpec], *, what: str) -> dict[str, tuple[Span, ...]]:
    """One window for every word, or a dict ``{"default": "0:0.8", "circle": "0:0.4"}``.

    Returns a dict with the key :data:`DEFAULT_KEY` and one key per named word.
    """
    if isinstance(spec, Mapping):
        windows = {str(key): parse_window(value, what=f"{what}[{key!r}]") for key, value in spec.items()}
        if not all(key.strip() for key in windows):
            raise EditError(f"{what}: a per-word window needs a word as its key")
        windows.setdefault(DEFAULT_KEY, ())
        return windows
    return {DEFAULT_KEY: parse_window(spec, what=what)}


def steps_in(window: tuple[Span, ...], num_steps: int | None, what: str) -> frozenset[int]:
    """The step indices of an ``num_steps``-step run that ``window`` covers."""
    if not window:
        return frozenset()
    try:
        return steps.steps_in(window, num_steps, what=what)
    except StepWindowError as error:
        raise EditError(str(error)) from None


__all__ = ["CROSS_STEPS", "DEFAULT_KEY", "SELF_STEPS", "WindowSpec", "describe", "parse_window", "parse_word_windows", "steps_in"]

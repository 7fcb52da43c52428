"""Step windows of an edit: when a replacement applies, resolved once per run.

prompt-to-prompt (Hertz et al. 2022) injects the source maps only in the
first part of sampling (``cross_replace_steps=0.8``) and lets the target
prompt finish the details, and allows a different window per word. A window
here is written like a selector's ``steps``: step indices ``"0:20"``,
fractions ``"0:0.8"`` (step ``i`` of ``N`` sits at ``i / N``), a float ``0.8``
or ``"0.8"`` (short for ``0:0.8``; a bare integer ``"2"`` is step 2 alone),
a pair ``(0, 0.8)``, or ``None`` for no step at all.
Windows are turned into sets of step indices once ``N`` is known, never by
counting layer calls.
"""

from __future__ import annotations

from typing import Mapping, Union

from ..selector import Selector, SelectorError, Span
from .errors import EditError

WindowSpec = Union[str, float, int, tuple, None]
DEFAULT_KEY = "default"


def parse_window(spec: WindowSpec, *, what: str) -> tuple[Span, ...]:
    """A window spec -> spans (empty tuple: no step).

    Args:
        spec: see the module docstring.
        what: the option's name, for error messages (``"cross_steps"``).
    """
    if spec is None:
        return ()
    if isinstance(spec, bool):
        raise EditError(f"{what}: {spec!r} is not a step window; write e.g. '0:0.8' or '0:20'")
    if isinstance(spec, str) and ":" not in spec and "." in spec:
        try:
            spec = float(spec)  # "0.8" on a command line means the same as 0.8
        except ValueError:
            pass
    if isinstance(spec, (int, float)):
        if not 0.0 <= float(spec) <= 1.0:
            raise EditError(f"{what}: a single number is a fraction of the schedule in 0..1 (e.g. 0.8 = '0:0.8'), "
                            f"not {spec!r}; write a range such as '0:20' for step indices")
        spec = f"0:{float(spec)!r}"
    elif isinstance(spec, tuple):
        if len(spec) != 2:
            raise EditError(f"{what}: a window tuple is (start, stop), not {spec!r}")
        spec = ":".join("" if v is None else repr(v) for v in spec)
    if not isinstance(spec, str):
        raise EditError(f"{what}: expected a window such as '0:0.8', 0.8 or (0, 20), not {type(spec).__name__}")
    try:
        spans = Selector.from_dict({"steps": spec}).steps
    except SelectorError as error:
        raise EditError(f"{what}: {error}") from None
    return tuple(spans)


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
    if num_steps is None:
        if any(span.fractional for span in window):
            raise EditError(f"{what}: a fractional window needs the number of steps; run the edit through a "
                            "pipeline, or pass `scheduler=` to xattn.hooks(...)")
        stops = [int(span.stop) for span in window if span.stop is not None]
        if len(stops) < len(window):
            raise EditError(f"{what}: an open-ended window needs the number of steps")
        return frozenset(s for s in range(max(stops)) if any(span.contains(s) for span in window))
    return frozenset(s for s in range(num_steps) if any(span.contains(s, num_steps) for span in window))


def describe(window: tuple[Span, ...]) -> str | None:
    """The window as text for manifests (``None``: no step)."""
    return ",".join(str(span) for span in window) if window else None


__all__ = ["DEFAULT_KEY", "WindowSpec", "describe", "parse_window", "parse_word_windows", "steps_in"]

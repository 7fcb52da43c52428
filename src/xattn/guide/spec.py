"""Guidance written as text, the way the CLI and config files take it.

    excite  "circle,square"                 words whose attention must peak somewhere
    bind    "red=circle,blue=square"        modifier=noun pairs
    box     "red circle=0,0,0.5,1"          phrase=x0,y0,x1,y1 (fractions of the image), one per box
    focus   "red,circle"                    words kept in one disk the image picks: one object
    refine  "0:0.95,10:0.5"                 step:target: at those steps, step again until the loss is at most target
"""

from __future__ import annotations

import re
from typing import Sequence

from .controller import Guide
from .losses import Bind, Excite, Focus, GuidanceError, Layout


def _comma_words(text: str) -> list[str]:
    """``"circle, square"`` -> ``["circle", "square"]``; ``[""]`` when none, so the loss names the empty word."""
    return [word.strip() for word in text.split(",") if word.strip()] or [""]


def parse_excite(text: str) -> Excite:
    return Excite(_comma_words(text))


def parse_focus(text: str, radius: float | None = None) -> Focus:
    words = _comma_words(text)
    return Focus(words) if radius is None else Focus(words, radius=radius)


def parse_bind(text: str) -> Bind:
    pairs = {}
    for item in text.split(","):
        modifier, sep, noun = item.partition("=")
        if not sep or not modifier.strip() or not noun.strip():
            raise GuidanceError(f"--bind takes modifier=noun pairs such as red=circle,blue=square, not {text!r}")
        pairs[modifier.strip()] = noun.strip()
    return Bind(pairs)


def parse_box(text: str) -> tuple[str, tuple[float, ...]]:
    phrase, sep, numbers = text.rpartition("=")
    try:
        box = tuple(float(n) for n in numbers.split(","))
    except ValueError:
        box = ()
    if not sep or not phrase.strip() or len(box) != 4:
        raise GuidanceError(f"--box takes phrase=x0,y0,x1,y1 (fractions of the image) such as "
                            f"'red circle=0,0,0.5,1', not {text!r}")
    return phrase.strip(), box


def parse_refine(text: str) -> dict[int, float]:
    """``"0:0.95,10:0.5"`` -> ``{0: 0.95, 10: 0.5}`` (the Guide checks the numbers)."""
    refine = {}
    for item in text.split(","):
        step, sep, target = item.partition(":")
        if not sep or not re.fullmatch(r"[0-9]+", step.strip()) or not target.strip():
            raise GuidanceError(f"--guide-refine takes STEP:TARGET pairs such as 0:0.95,10:0.5 (a step index and "
                                f"the loss to reach there), not {text!r}")
        refine[int(step)] = target.strip()
    return refine


def guide_from_text(*, excite: str | None = None, bind: str | None = None, boxes: Sequence[str] = (),
                    focus: str | None = None, focus_radius: float | None = None,
                    steps: str | float | None = None, step_size: float | None = None,
                    refine: str | None = None) -> Guide | None:
    """The Guide these options describe, or None when they name no loss."""
    if focus_radius is not None and focus is None:
        raise GuidanceError("--focus-radius needs --focus: the words whose disk it sizes")
    losses = []  # an option given empty ("--excite ''", a script's unset variable) is refused, not skipped
    if excite is not None:
        losses.append(parse_excite(excite))
    if bind is not None:
        losses.append(parse_bind(bind))
    if boxes:
        losses.append(Layout(dict(parse_box(box) for box in boxes)))
    if focus is not None:
        losses.append(parse_focus(focus, focus_radius))
    if not losses:
        if steps is not None or step_size is not None or refine is not None:
            raise GuidanceError("--guide-steps, --guide-step-size and --guide-refine need a loss: --excite, --bind, "
                                "--box or --focus")
        return None
    options = {"steps": steps if steps is not None else 0.5}
    if step_size is not None:
        options["step_size"] = step_size
    if refine is not None:
        options["refine"] = parse_refine(refine)
    return Guide(*losses, **options)


__all__ = ["guide_from_text", "parse_bind", "parse_box", "parse_excite", "parse_focus", "parse_refine"]

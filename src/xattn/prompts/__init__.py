"""Prompts as people write them: the A1111 and compel dialects, compiled to one weighted record.

:func:`parse_prompt` reads a prompt in a dialect and returns a
:class:`WeightedPrompt`: the clean text for the tokenizer, the spans that
carry a weight, and the fragments (and ``BREAK`` chunk breaks) in the order
the dialect's encoder tokenizes them. ``docs/prompts.md`` lists the rules of
each dialect and how they differ. A1111's prompt editing and alternation make a
step schedule instead (:func:`parse_schedule`), run by :class:`PromptSchedule`; its ``AND``
(composable diffusion) splits a prompt into weighted sub-prompts (:func:`split_composition`),
run by :class:`ComposedPrompt`.
"""

from __future__ import annotations

from .a1111 import PromptWarning, parse_attention, read_a1111, read_a1111_text
from .compel import read_compel
from .editing import ScheduleEntry, has_schedule, parse_schedule, text_at, texts_by_step
from .encode import LongPromptTokenizer, PromptEmbeds, encode_prompt
from .types import (Fragment, PromptSyntaxError, ScheduledPromptError, UnsupportedSyntaxError, WeightedPrompt,
                    WeightedSpan)

SYNTAXES = {"a1111": read_a1111, "compel": read_compel}

__all__ = [
    "SYNTAXES",
    "ComposedPrompt",
    "Fragment",
    "LongPromptTokenizer",
    "PromptEmbeds",
    "PromptSyntaxError",
    "PromptSchedule",
    "PromptWarning",
    "ScheduleEntry",
    "ScheduleTokenizer",
    "ScheduledPromptError",
    "UnsupportedSyntaxError",
    "WeightedPrompt",
    "WeightedSpan",
    "encode_prompt",
    "is_composed",
    "split_composition",
    "has_schedule",
    "parse_attention",
    "parse_prompt",
    "parse_schedule",
    "text_at",
    "texts_by_step",
]

_TEXT_SYNTAX = "a1111-text"  # internal: one text of a schedule, attention rules only (schedule.TEXT_SYNTAX)


def __getattr__(name: str):
    if name in ("ComposedPrompt", "SubPrompt", "is_composed", "split_composition"):  # late, as PromptSchedule
        from . import compose

        return getattr(compose, name)
    if name in ("PromptSchedule", "ScheduleTokenizer"):  # imported late: the controller needs the hook machinery
        from . import schedule

        return getattr(schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_prompt(text: str, syntax: str = "a1111", strict: bool = False) -> WeightedPrompt:
    """Read a weighted prompt.

    Args:
        text: the prompt as written, e.g. ``"a (red:1.5) circle"``.
        syntax: ``"a1111"`` (default: exactly what the A1111 web UI reads) or ``"compel"``.
        strict: raise :class:`PromptSyntaxError` where A1111 silently repairs a prompt
            (unbalanced brackets, a stray backslash, a colon in a group that is no weight, ``()``).

    Raises :class:`UnsupportedSyntaxError` for syntax that is not one weighted
    prompt: A1111's ``AND`` (composable diffusion, :func:`split_composition`, :class:`ComposedPrompt`) and
    compel's ``withLora()``; and its subclass :class:`ScheduledPromptError` for
    A1111's prompt editing and alternation, which are a step schedule
    (:func:`parse_schedule`, :class:`PromptSchedule`). compel's ``.blend()``,
    ``.and()`` and ``.swap()`` parse, and are carried on ``WeightedPrompt.operator``.
    """
    if syntax == _TEXT_SYNTAX:
        return read_a1111_text(text, strict=strict)
    if syntax not in SYNTAXES:
        raise PromptSyntaxError(f"unknown prompt syntax {syntax!r}; use one of {', '.join(SYNTAXES)}", syntax, 0)
    return SYNTAXES[syntax](text, strict=strict)

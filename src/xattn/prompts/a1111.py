r"""The A1111 dialect: prompts read exactly as the AUTOMATIC1111 web UI reads them.

The rules, restated from A1111's documentation and the docstring examples of
its ``parse_prompt_attention`` (this is an independent implementation):

* ``(`` multiplies what follows by 1.1 until its ``)``; ``[`` divides by 1.1
  until its ``]``. Round and square brackets are matched separately (each
  closer closes the last opener of its own kind), so they need not nest.
* A colon, optional spaces, a number ``[+-]?[.0-9]+``, optional spaces and
  ``)`` close the last open ``(`` with that number as its factor instead of
  1.1: in ``(artist:nixeu:1.2)`` only the last colon is a weight. Any other
  colon is text (``(a:1e1)`` is ``a:1e1`` × 1.1).
* A closer with no opener of its kind is text (``smile :)``). An opener never
  closed acts up to the end; at the end the unclosed ``(`` are applied first,
  then the unclosed ``[``, each in the order they were opened.
* ``\(`` ``\)`` ``\[`` ``\]`` ``\\`` are the literal characters; any other
  backslash disappears (``\m/`` is ``m/``).
* ``BREAK`` as a whole word of plain text, with the spaces around it, is a
  chunk break. A BREAK inside brackets has its marker weight (-1) multiplied
  and is then, as in A1111, the word ``BREAK`` with that (negative) weight.
* Neighbouring pieces of exactly equal weight are merged; an encoder
  tokenizes piece by piece.

Weights multiply in the order A1111 applies them, so they are equal as
floats, not only close. :func:`read_a1111` also recognises what A1111 reads
*before* this step: extra networks ``<lora:name:0.8>`` are stripped (with a
warning), ``AND`` is refused (run by :class:`xattn.prompts.ComposedPrompt`), and prompt editing ``[a:b:0.5]`` / alternation
``[a|b]`` raise :class:`ScheduledPromptError`: such a prompt is a step schedule
(:mod:`xattn.prompts.editing`), run by :class:`xattn.prompts.PromptSchedule`.
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple

from .editing import has_schedule
from .types import (Fragment, PromptSyntaxError, ScheduledPromptError, UnsupportedSyntaxError, WeightedPrompt,
                    weighted_prompt)

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
_BREAK_WEIGHT = -1.0  # A1111 marks a BREAK with weight -1 and only treats it as one while it is still -1
_SPECIAL = "\\()[]:"
_ESCAPABLE = "()[]\\"

# What A1111 reads before the attention syntax (patterns of its documented syntax, not of its code).
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b")


class PromptWarning(UserWarning):
    """Something in a prompt that xattn removed or cannot honour exactly."""


class _Token(NamedTuple):
    kind: str  # "text", "escape", "open", "close", "weight"
    text: str  # the characters as text: the escaped character, "(" ... or the whole weight "):1.5)"
    column: int
    literal: str = ""  # the number of a weight


def read_a1111(prompt: str, strict: bool = False) -> WeightedPrompt:
    """Read ``prompt`` as A1111 does; ``strict`` raises where A1111 silently repairs.

    Raises :class:`UnsupportedSyntaxError` for ``AND``, :class:`ScheduledPromptError`
    for prompt editing and alternation (a step schedule: see :class:`xattn.prompts.PromptSchedule`),
    and warns (:class:`PromptWarning`) when it strips extra network tags such as ``<lora:name:0.8>``.
    """
    prompt = _strip_extra_networks(prompt)
    _refuse_unsupported(prompt)
    return weighted_prompt(parse_attention(prompt, strict=strict), "a1111")


def read_a1111_text(prompt: str, strict: bool = False) -> WeightedPrompt:
    """One text of a schedule (no editing left to read) under A1111's attention rules."""
    return weighted_prompt(parse_attention(prompt, strict=strict), "a1111")


def strip_extra_networks(prompt: str) -> str:
    """``prompt`` without ``<lora:...>`` tags (warned about), as A1111 reads it before anything else."""
    return _strip_extra_networks(prompt)


def refuse_composition(prompt: str) -> None:
    """Raise :class:`UnsupportedSyntaxError` for ``AND`` (composable diffusion; A1111 splits before escapes)."""
    if match := _AND.search(prompt):
        raise UnsupportedSyntaxError("AND (composable diffusion) is not one weighted prompt: it combines one noise "
                                     "prediction per sub-prompt; run it with xattn.prompts.ComposedPrompt (xattn "
                                     "generate does), or read its parts with xattn.prompts.split_composition",
                                     prompt, match.start())


def parse_attention(prompt: str, strict: bool = False) -> list[Fragment]:
    """The weighted pieces of ``prompt`` under A1111's attention rules (no AND / editing handling)."""
    pieces: list[list] = []  # [text, starting weight, is a BREAK marker]
    ranges: list[tuple[int, int, float]] = []  # (first piece, end piece, factor) in the order A1111 applies them
    opened: dict[str, list[tuple[int, int]]] = {"(": [], "[": []}  # bracket -> [(first piece, column)]
    for token in _tokens(prompt):
        if token.kind == "escape":
            if strict and not token.text:
                _fail("A1111 drops a backslash that does not escape ( ) [ ] or \\", prompt, token.column)
            pieces.append([token.text, 1.0, False])
        elif token.kind == "open":
            opened[token.text].append((len(pieces), token.column))
        elif token.kind in ("close", "weight") and opened[_OPENER.get(token.text[:1], "(")]:
            first, column = opened[_OPENER.get(token.text[:1], "(")].pop()
            factor = _factor(token, prompt)
            if strict and first == len(pieces):
                _fail("empty group: there is nothing to weight", prompt, column)
            ranges.append((first, len(pieces), factor))
        else:
            if strict:
                _check_text(token, opened, prompt)
            pieces.extend(_break_pieces(token.text))
    for bracket, factor in (("(", ROUND_FACTOR), ("[", SQUARE_FACTOR)):
        for first, column in opened[bracket]:
            if strict:
                _fail(f"unbalanced '{bracket}': it is never closed", prompt, column)
            ranges.append((first, len(pieces), factor))
    weighted = [[text, _weight(index, start, ranges), marker] for index, (text, start, marker) in enumerate(pieces)]
    if strict and any(marker and weight != _BREAK_WEIGHT for _, weight, marker in weighted):
        _fail("BREAK inside brackets is the word BREAK with a negative weight in A1111", prompt, prompt.find("BREAK"))
    return _merged(weighted or [["", 1.0, False]])


_OPENER = {")": "(", "]": "[", ":": "("}


def _tokens(prompt: str):
    """Cut ``prompt`` into escapes, brackets, weights and runs of plain text."""
    position = 0
    while position < len(prompt):
        char = prompt[position]
        if char == "\\":
            escaped = prompt[position + 1 : position + 2]
            if escaped and escaped in _ESCAPABLE:
                yield _Token("escape", escaped, position)
                position += 2
            else:
                yield _Token("escape", "", position)
                position += 1
        elif char in "([":
            yield _Token("open", char, position)
            position += 1
        elif char in ")]":
            yield _Token("close", char, position)
            position += 1
        elif char == ":":
            end, literal = _weight_at(prompt, position)
            yield _Token("weight", prompt[position:end], position, literal) if end else _Token("text", ":", position)
            position = end or position + 1
        else:
            end = position
            while end < len(prompt) and prompt[end] not in _SPECIAL:
                end += 1
            yield _Token("text", prompt[position:end], position)
            position = end


def _weight_at(prompt: str, colon: int) -> tuple[int, str]:
    """``(end, number)`` if a weight ``: 1.5 )`` starts at ``colon``, else ``(0, "")``."""
    start = _skip_spaces(prompt, colon + 1)
    digits = start + (start < len(prompt) and prompt[start] in "+-")
    end = digits
    while end < len(prompt) and (prompt[end] == "." or prompt[end].isdecimal()):
        end += 1
    if end == digits:
        return 0, ""
    close = _skip_spaces(prompt, end)
    if close < len(prompt) and prompt[close] == ")":
        return close + 1, prompt[start:end]
    return 0, ""


def _skip_spaces(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _factor(token: _Token, prompt: str) -> float:
    if token.kind == "close":
        return ROUND_FACTOR if token.text == ")" else SQUARE_FACTOR
    try:
        return float(token.literal)
    except ValueError:  # "1.2.3" fits the pattern; A1111 fails on it too
        raise PromptSyntaxError(f"{token.literal!r} is not a number", prompt, token.column) from None


def _break_pieces(text: str) -> list[list]:
    """Plain text cut at each whole-word ``BREAK``; the spaces around a BREAK belong to it."""
    pieces, position = [], 0
    for start, end in _breaks_in(text):
        pieces += [[text[position:start], 1.0, False], ["BREAK", _BREAK_WEIGHT, True]]
        position = end
    return pieces + [[text[position:], 1.0, False]]


def _breaks_in(text: str):
    """``(start, end)`` of each BREAK with its surrounding whitespace, left to right."""
    position = 0
    while (found := text.find("BREAK", position)) != -1:
        after = found + len("BREAK")
        whole_word = (found == 0 or not _is_word(text[found - 1])) and (after == len(text) or not _is_word(text[after]))
        if not whole_word:
            position = found + 1
            continue
        start = found
        while start > position and text[start - 1].isspace():
            start -= 1
        end = _skip_spaces(text, after)
        yield start, end
        position = end


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _weight(index: int, start: float, ranges: list[tuple[int, int, float]]) -> float:
    weight = start
    for first, end, factor in ranges:
        if first <= index < end:
            weight *= factor
    return weight


def _merged(pieces: list[list]) -> list[Fragment]:
    """Join neighbours of equal weight; like A1111's encoder, the text BREAK at weight -1 is a break."""
    runs: list[list] = []
    for text, weight, marker in pieces:
        if runs and runs[-1][1] == weight:
            runs[-1][0] += text
            runs[-1][2] = False
        else:
            runs.append([text, weight, marker])
    return [Fragment(text, weight, is_break=text == "BREAK" and weight == _BREAK_WEIGHT) for text, weight, _ in runs]


def _check_text(token: _Token, opened: dict, prompt: str) -> None:
    """Strict mode: the repairs A1111 makes silently are errors."""
    if token.kind in ("close", "weight"):
        closer = token.text[-1]
        _fail(f"unbalanced '{closer}': no '{_OPENER[closer]}' is open", prompt, token.column + len(token.text) - 1)
    if token.text.startswith(":") and (opened["("] or opened["["]):
        _fail("a colon inside a group must start its weight, e.g. (words:1.5)", prompt, token.column)


def _fail(reason: str, prompt: str, column: int):
    raise PromptSyntaxError(reason, prompt, max(column, 0))


def _strip_extra_networks(prompt: str) -> str:
    tags = [match.group(0) for match in _EXTRA_NETWORK.finditer(prompt)]
    if tags:
        warnings.warn(f"removed {', '.join(tags)} from the prompt: the CLI loads <lora:...> tags with --lora-dir; "
                      "in Python, load them yourself (pipe.load_lora_weights, pipe.set_adapters)",
                      PromptWarning, stacklevel=3)
    return _EXTRA_NETWORK.sub("", prompt)


def _refuse_unsupported(prompt: str) -> None:
    """Raise for AND, and for prompt editing / alternation (a schedule, not one weighted prompt)."""
    refuse_composition(prompt)
    if has_schedule(prompt):
        raise ScheduledPromptError("prompt editing [from:to:when] / alternation [a|b] make a step schedule, not "
                                   "one prompt: run it with xattn.prompts.PromptSchedule (xattn generate does), "
                                   "or read its texts with xattn.prompts.parse_schedule", prompt,
                                   max(prompt.find("["), 0))

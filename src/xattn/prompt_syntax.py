r"""Weighted prompts: read the A1111 and compel weighting syntaxes.

People write prompt weights inline, e.g. ``a (red:1.5) circle`` (A1111) or
``a red++ circle`` (compel). :func:`parse_prompt` splits such a prompt into

* the *clean* text that goes to the tokenizer (``a red circle``), and
* :class:`WeightedSpan` records: which characters of the clean text carry a
  weight other than 1, and what that weight is.

The reweighting controller then scales the attention to those words. This
module is pure Python; it knows nothing about tokenizers or tensors.

Grammar
-------
Written as EBNF over characters. ``word_char`` is a letter, a digit or ``_``
(``str.isalnum()`` or ``_``); a ``connector`` is ``-``, ``+`` or ``'``::

    prompt        = item* ;
    item          = paren_group | bracket_group | escape | word | other_char ;
    paren_group   = "(" item+ [ ":" weight ] ")" [ group_suffix ] ;
    bracket_group = "[" item+ "]" ;
    word          = word_char+ { connector+ word_char+ } [ sign_suffix ] ;
    group_suffix  = number | sign_suffix ;       (* must end at a boundary *)
    sign_suffix   = "+"+ | "-"+ ;                (* must end at a boundary *)
    (* in the escape rule, "\" stands for one backslash character *)
    escape        = "\" ( "(" | ")" | "[" | "]" | "\" | ":" | "+" | "-" ) ;
    weight        = spaces [ "+" | "-" ] number spaces ;
    number        = digit+ [ "." digit* ] | "." digit+ ;

A *boundary* is the end of the text or any character that is neither a
``word_char`` nor a ``connector`` (space, comma, ``)``, ``]``, ...).
``other_char`` is any character not consumed by the other rules; it is copied
to the clean text unchanged with weight 1.

What each form means
--------------------
Weights multiply through nesting: a word's weight is the product of the
factors of every group around it and of its own suffix.

===========================  =============================================
``(words)``                  ×1.1  (A1111)
``((words))``                ×1.1² = ×1.21, and so on
``[words]``                  ÷1.1  (A1111); ``[[words]]`` is ÷1.1²
``(words:1.5)``              ×1.5  (A1111); also ``-1``, ``+2``, ``.5``, ``2.``
``(words)1.5``               ×1.5  (compel: a number right after ``)``)
``(words)++``                ×1.1² (compel: ×1.1 per ``+``)
``(words)--``                ×0.9² (compel: ×0.9 per ``-``)
``word+`` / ``word-``        ×1.1 / ×0.9 per sign, on that one word (compel)
``\(`` ``\)`` ``\[`` ``\]``  the literal character, without weighting;
``\\`` ``\:`` ``\+`` ``\-``  (so ``C\+\+`` is the plain text ``C++``)
===========================  =============================================

``+`` multiplies by 1.1 and ``-`` by 0.9 (compel's own convention), so
``word-`` is 0.9, not 1/1.1 ≈ 0.909 as ``[word]`` is.

Rules for the ambiguous cases
-----------------------------
* ``(words)`` followed *immediately* by a number that ends at a boundary is
  compel's explicit weight: ``(cat)1.3`` is 1.3. Anything else after ``)``
  leaves the A1111 meaning, ×1.1: ``(cat) 1.3`` is ``cat`` ×1.1 followed by
  the text `` 1.3``, and ``(cat)2nd`` is ``cat`` ×1.1 followed by ``2nd``.
* A run of only ``+`` or only ``-`` right after a word or a ``)`` is a weight
  suffix when it ends at a boundary: ``red+,`` and ``red--`` are weighted.
  Signs *between* word characters belong to the word: ``x-ray``, ``a+b`` and
  ``well-known`` are plain words, and ``well-known-`` is ``well-known`` ×0.9.
  A mixed run (``red+-``), a sign that does not follow a word or ``)``
  (``- 5``, ``-5``), or a sign after ``]`` (``[cat]+``) is plain text.
* A group takes one explicit weight: ``(cat:2)1.5`` and ``(cat:2)++`` are
  errors; nest the groups if you mean a product: ``((cat:2))1.5``.
* A colon outside any ``(...)`` group is plain text (``style: photo``,
  ``:1.5``). Inside a ``(...)`` group, an unescaped colon that is not inside a
  nested group starts the weight, so everything from it to the ``)`` must be
  a number: ``(style: photo)`` is an error; write ``(style\: photo)``.
* A colon inside ``[...]`` is an error: A1111's grammar has no weighted
  square brackets. (A1111's prompt editing, ``[from:to:when]``, is not
  supported.)
* A backslash must start one of the escapes above; any other backslash,
  including one at the very end, is an error (write ``\\`` for a literal
  backslash).
* Weights must be finite, and so must their products; groups may nest at most
  :data:`MAX_NESTING` deep; a group must contain something besides
  whitespace (``()``, ``( )`` and ``(:2)`` are errors).

The clean text and the spans
----------------------------
The clean text is the input with the syntax characters removed and nothing
else changed: whitespace inside and around groups is kept as written, so
``a (red:2) circle`` gives ``a red circle`` and ``(red :2)`` gives ``red ``.

:attr:`WeightedPrompt.spans` lists one :class:`WeightedSpan` per maximal run
of clean text with the same weight ≠ 1, with whitespace trimmed from both ends
(runs of only whitespace are dropped). Text with weight 1 is not listed. A
weight within 1e-9 of 1 counts as 1, so ``[(cat)]`` is plain ``cat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .errors import XattnError

__all__ = [
    "MAX_NESTING",
    "MINUS_FACTOR",
    "PAREN_FACTOR",
    "PLUS_FACTOR",
    "PromptSyntaxError",
    "WeightedPrompt",
    "WeightedSpan",
    "parse_prompt",
]

PAREN_FACTOR = 1.1  # ``(words)`` multiplies by this; ``[words]`` divides by it
PLUS_FACTOR = 1.1  # per ``+`` in a compel suffix
MINUS_FACTOR = 0.9  # per ``-`` in a compel suffix
MAX_NESTING = 100  # deepest allowed nesting of ( and [ groups

_ESCAPABLE = "()[]\\:+-"
_CONNECTORS = "-+'"
_DIGITS = "0123456789"
_NEAR_ONE = 1e-9


# -- public types -------------------------------------------------------------


class PromptSyntaxError(XattnError, ValueError):
    """A prompt that does not follow the weighting grammar.

    ``column`` is the 0-based index into the original text where the problem
    is; the message names it and shows the offending line with a caret under
    that column.
    """

    def __init__(self, reason: str, prompt: str, column: int):
        self.reason = reason
        self.prompt = prompt
        self.column = column
        super().__init__(f"{reason} (column {column})\n{_caret_picture(prompt, column)}")


@dataclass(frozen=True)
class WeightedSpan:
    """Characters ``[start, end)`` of the clean prompt and their weight."""

    text: str  # the word(s) as they appear in the clean prompt, e.g. "red circle"
    start: int
    end: int
    weight: float


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt with its weighting syntax removed.

    ``text`` is what the tokenizer should see; ``spans`` says which parts of
    it carry a weight other than 1, in order of position.
    """

    text: str
    spans: tuple[WeightedSpan, ...]

    def weights(self) -> dict[str, float]:
        """Word -> weight for every word that lies inside a span.

        Words are runs of letters, digits and ``_`` joined by inner
        ``-``, ``+`` or ``'`` (``x-ray`` is one word), as in the module
        grammar. A group is split into its words: ``(red circle:1.3)`` gives
        ``{"red": 1.3, "circle": 1.3}``.

        Repeated words use the n-th occurrence convention: the key of a word's
        first occurrence in the clean prompt is the word itself (``"red"``),
        the second is ``"red#2"``, the third ``"red#3"``. Occurrences are
        counted over the whole clean prompt, weighted or not and ignoring
        case, so in ``red and (red:2)`` the weighted word is ``"red#2"``.
        (:meth:`xattn.tokens.TokenMap.indices` reads ``"red#2"`` the same way,
        but reads a bare ``"red"`` as *every* occurrence.)

        A word only partly inside a span (``(red)dish`` weights the ``red``
        of ``reddish``) is not listed; :attr:`spans` still records it.
        """
        result: dict[str, float] = {}
        occurrences: dict[str, int] = {}
        for word, start, end in _find_words(self.text):
            count = occurrences[word.lower()] = occurrences.get(word.lower(), 0) + 1
            span = next((s for s in self.spans if s.start <= start and end <= s.end), None)
            if span is not None:
                result[word if count == 1 else f"{word}#{count}"] = span.weight
        return result


def parse_prompt(text: str) -> WeightedPrompt:
    """Split a prompt in A1111/compel syntax into clean text and weighted spans.

    Raises :class:`PromptSyntaxError` when the prompt breaks the grammar in
    the module docstring.
    """
    pieces = _Parser(text).parse()
    clean = "".join(piece.text for piece in pieces)
    return WeightedPrompt(clean, _spans_from_pieces(pieces))


# -- the parser ---------------------------------------------------------------


class _Piece(NamedTuple):
    """A bit of clean text and its weight relative to the enclosing group."""

    text: str
    weight: float


class _OpenGroup(NamedTuple):
    """The bracket that the parser is currently inside of."""

    char: str  # "(" or "["
    column: int

    @property
    def closer(self) -> str:
        return ")" if self.char == "(" else "]"


class _Parser:
    """Recursive-descent parser, one method per grammar rule.

    Every ``parse_*`` method starts at ``self.position`` and leaves it just
    after what it consumed. The methods return lists of :class:`_Piece`;
    group methods scale their content's weights by the group's factor.
    """

    def __init__(self, text: str):
        self.text = text
        self.position = 0
        self.depth = 0

    # -- helpers --

    def peek(self, offset: int = 0) -> str:
        """The character ``offset`` places ahead, or ``""`` past the end."""
        index = self.position + offset
        return self.text[index] if index < len(self.text) else ""

    def error(self, reason: str, column: int) -> PromptSyntaxError:
        return PromptSyntaxError(reason, self.text, column)

    def at_boundary(self, index: int) -> bool:
        """True where a suffix may end: the end of text or a non-word, non-connector character."""
        if index >= len(self.text):
            return True
        char = self.text[index]
        return not (_is_word_char(char) or char in _CONNECTORS)

    # -- rules --

    def parse(self) -> list[_Piece]:
        return self.parse_items(inside=None)

    def parse_items(self, inside: _OpenGroup | None) -> list[_Piece]:
        """Items up to the end of the text, or up to the ``)``/``]``/``:`` that ends ``inside``."""
        pieces: list[_Piece] = []
        while self.position < len(self.text):
            char = self.text[self.position]
            if char == "(":
                pieces.extend(self.parse_paren_group())
            elif char == "[":
                pieces.extend(self.parse_bracket_group())
            elif char in ")]":
                if inside is not None and char == inside.closer:
                    return pieces
                raise self.unbalanced_closer(char, inside)
            elif char == ":" and inside is not None:
                if inside.char == "(":
                    return pieces  # the group reads its own weight
                raise self.error(
                    "a [...] group cannot carry a weight: A1111's grammar only weights (...) groups, "
                    "so write (words:2) instead; prompt editing [from:to:when] is not supported",
                    self.position,
                )
            elif char == "\\":
                pieces.append(self.parse_escape())
            elif _is_word_char(char):
                pieces.append(self.parse_word())
            else:
                pieces.append(_Piece(char, 1.0))
                self.position += 1
        if inside is not None:
            raise self.error(f"unbalanced '{inside.char}': it is never closed", inside.column)
        return pieces

    def parse_paren_group(self) -> list[_Piece]:
        """``( items [:weight] ) [suffix]``."""
        group = self.open_group("(")
        content = self.parse_items(inside=group)
        self.check_not_empty(content, group)
        explicit_weight = self.parse_colon_weight(group) if self.peek() == ":" else None
        self.close_group()
        suffix_column = self.position
        suffix_weight = self.parse_group_suffix()
        if explicit_weight is not None and suffix_weight is not None:
            raise self.error(
                "this group already has a weight after ':'; a group takes one weight "
                "(nest groups to multiply, e.g. ((words:2))1.5)",
                suffix_column,
            )
        if explicit_weight is not None:
            factor = explicit_weight
        elif suffix_weight is not None:
            factor = suffix_weight
        else:
            factor = PAREN_FACTOR
        return self.scaled(content, factor, group)

    def parse_bracket_group(self) -> list[_Piece]:
        """``[ items ]``: divides by 1.1."""
        group = self.open_group("[")
        content = self.parse_items(inside=group)
        self.check_not_empty(content, group)
        self.close_group()
        return self.scaled(content, 1.0 / PAREN_FACTOR, group)

    def parse_colon_weight(self, group: _OpenGroup) -> float:
        """``: weight`` up to (not including) the group's ``)``."""
        colon_column = self.position
        closing = self.text.find(")", colon_column)
        if closing == -1:
            raise self.error("unbalanced '(': it is never closed", group.column)
        raw = self.text[colon_column + 1 : closing]
        literal = raw.strip()
        literal_column = colon_column + 1 + (len(raw) - len(raw.lstrip()))
        if not literal:
            raise self.error("expected a weight after ':', e.g. (words:1.5)", literal_column)
        if _number_end(literal, 0, allow_sign=True) != len(literal):
            if _is_non_finite(literal):
                raise self.error(f"the weight must be a finite number, not {literal!r}", literal_column)
            raise self.error(f"expected a number after ':', got {literal!r}", literal_column)
        weight = float(literal)
        if not math.isfinite(weight):  # e.g. 400 digits
            raise self.error(f"the weight must be a finite number, not {literal!r}", literal_column)
        self.position = closing
        return weight

    def parse_group_suffix(self) -> float | None:
        """compel's ``(words)1.3`` / ``(words)++`` / ``(words)--``, or None if absent."""
        start = self.position
        number_end = _number_end(self.text, start, allow_sign=False)
        if number_end is not None and self.at_boundary(number_end):
            literal = self.text[start:number_end]
            weight = float(literal)
            if not math.isfinite(weight):
                raise self.error(f"the weight must be a finite number, not {literal!r}", start)
            self.position = number_end
            return weight
        return self.parse_sign_suffix()

    def parse_word(self) -> _Piece:
        """A word and its optional ``+``/``-`` suffix."""
        start = self.position
        self.position = _word_end(self.text, start)
        word = self.text[start : self.position]
        factor = self.parse_sign_suffix()
        return _Piece(word, 1.0 if factor is None else factor)

    def parse_sign_suffix(self) -> float | None:
        """A run of only ``+`` or only ``-`` ending at a boundary; None (consuming nothing) otherwise."""
        sign = self.peek()
        if sign not in ("+", "-"):
            return None
        end = self.position
        while end < len(self.text) and self.text[end] in "+-":
            end += 1
        run = self.text[self.position : end]
        if run != sign * len(run) or not self.at_boundary(end):
            return None  # mixed signs or a sign inside a word: plain text
        self.position = end
        return (PLUS_FACTOR if sign == "+" else MINUS_FACTOR) ** len(run)

    def parse_escape(self) -> _Piece:
        """``\\`` and the character it makes literal."""
        column = self.position
        escaped = self.peek(1)
        if escaped == "":
            raise self.error("a lone backslash ends the prompt; write \\\\ for a literal backslash", column)
        if escaped not in _ESCAPABLE:
            raise self.error(
                f"unknown escape '\\{escaped}': a backslash may only precede one of ( ) [ ] \\ : + - "
                "(write \\\\ for a literal backslash)",
                column,
            )
        self.position += 2
        return _Piece(escaped, 1.0)

    # -- group bookkeeping --

    def open_group(self, char: str) -> _OpenGroup:
        if self.depth >= MAX_NESTING:
            raise self.error(f"groups nest deeper than {MAX_NESTING} levels", self.position)
        self.depth += 1
        group = _OpenGroup(char, self.position)
        self.position += 1
        return group

    def close_group(self) -> None:
        """Step over the closing bracket that :meth:`parse_items` stopped at."""
        self.depth -= 1
        self.position += 1

    def check_not_empty(self, content: list[_Piece], group: _OpenGroup) -> None:
        if all(piece.text.isspace() for piece in content):
            raise self.error(f"empty group '{group.char}{group.closer}': there is nothing to weight", group.column)

    def scaled(self, content: list[_Piece], factor: float, group: _OpenGroup) -> list[_Piece]:
        pieces = [_Piece(piece.text, piece.weight * factor) for piece in content]
        if not all(math.isfinite(piece.weight) for piece in pieces):
            raise self.error("the weights multiply to more than a float can hold", group.column)
        return pieces

    def unbalanced_closer(self, char: str, inside: _OpenGroup | None) -> PromptSyntaxError:
        opener = "(" if char == ")" else "["
        if inside is None:
            return self.error(f"unbalanced '{char}': no '{opener}' is open", self.position)
        return self.error(
            f"unbalanced '{char}': expected '{inside.closer}' to close the '{inside.char}' "
            f"at column {inside.column}",
            self.position,
        )


# -- character-level helpers --------------------------------------------------


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _word_end(text: str, start: int) -> int:
    """End of the word at ``start``: word chars, joined by runs of connectors."""
    end = start
    while True:
        while end < len(text) and _is_word_char(text[end]):
            end += 1
        after_connectors = end
        while after_connectors < len(text) and text[after_connectors] in _CONNECTORS:
            after_connectors += 1
        if after_connectors == end or after_connectors == len(text) or not _is_word_char(text[after_connectors]):
            return end
        end = after_connectors


def _find_words(text: str) -> list[tuple[str, int, int]]:
    """The words of ``text`` (as defined by the grammar) with their spans."""
    words = []
    position = 0
    while position < len(text):
        if _is_word_char(text[position]):
            end = _word_end(text, position)
            words.append((text[position:end], position, end))
            position = end
        else:
            position += 1
    return words


def _number_end(text: str, start: int, allow_sign: bool) -> int | None:
    """End of the longest ``number`` (optionally signed) at ``start``, or None if there is none."""
    position = start
    if allow_sign and position < len(text) and text[position] in "+-":
        position += 1
    whole_start = position
    while position < len(text) and text[position] in _DIGITS:
        position += 1
    has_digits = position > whole_start
    if position < len(text) and text[position] == ".":
        fraction_end = position + 1
        while fraction_end < len(text) and text[fraction_end] in _DIGITS:
            fraction_end += 1
        if has_digits or fraction_end > position + 1:
            has_digits = True
            position = fraction_end
    return position if has_digits else None


def _is_non_finite(literal: str) -> bool:
    """True for spellings Python reads as inf or nan (``inf``, ``-Infinity``, ``nan``)."""
    try:
        return not math.isfinite(float(literal))
    except ValueError:
        return False


def _caret_picture(prompt: str, column: int) -> str:
    """The line of ``prompt`` holding ``column``, with a caret under that column."""
    line_start = prompt.rfind("\n", 0, column) + 1
    line_end = prompt.find("\n", column)
    if line_end == -1:
        line_end = len(prompt)
    line = "".join(" " if char.isspace() else char for char in prompt[line_start:line_end])
    return f"  {line}\n  {' ' * (column - line_start)}^"


def _spans_from_pieces(pieces: list[_Piece]) -> tuple[WeightedSpan, ...]:
    """Merge neighbouring pieces of equal weight; keep the runs whose weight is not 1."""
    clean = "".join(piece.text for piece in pieces)
    runs: list[tuple[int, int, float]] = []  # (start, end, weight) in the clean text
    position = 0
    for piece in pieces:
        weight = 1.0 if abs(piece.weight - 1.0) <= _NEAR_ONE else piece.weight
        end = position + len(piece.text)
        if runs and runs[-1][2] == weight:
            runs[-1] = (runs[-1][0], end, weight)
        else:
            runs.append((position, end, weight))
        position = end
    spans = []
    for start, end, weight in runs:
        if weight == 1.0:
            continue
        while start < end and clean[start].isspace():
            start += 1
        while end > start and clean[end - 1].isspace():
            end -= 1
        if start < end:
            spans.append(WeightedSpan(clean[start:end], start, end, weight))
    return tuple(spans)

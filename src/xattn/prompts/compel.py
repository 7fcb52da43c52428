r"""The compel dialect: weights as compel (github.com/damian0815/compel) writes them.

What it reads (restated from compel's documented syntax; an independent implementation):

===============================  ===============================================
``word+`` ``word++`` ``word-``   ×1.1 per ``+``, ×0.9 per ``-``, on that word
``(words)``                      a group: ×1.0 (unlike A1111's ×1.1)
``(words)1.3`` ``(words)++``     the group's weight, written right after ``)``
``"quoted words"++``             the same for a quoted fragment
``(words).attend(1.3)``          the same, spelled out
``\(`` ``\)`` ``\"`` ``\+`` ...  the literal character
===============================  ===============================================

Weights multiply through nesting, outermost first, as compel multiplies
them. Neighbouring words of equal weight form one fragment; fragments are
joined with single spaces (compel also puts a space after every comma).

compel's operators that do more than weight words (``.blend()``,
``.and()`` / ``.add()``, ``.swap()``, ``withLora()`` / ``useLora()``) raise
:class:`UnsupportedSyntaxError`: they never become prompt text.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .types import Fragment, PromptSyntaxError, UnsupportedSyntaxError, WeightedPrompt, weighted_prompt

PLUS_FACTOR = 1.1
MINUS_FACTOR = 0.9
_OPERATORS = {".blend(": "blend", ".and(": "and", ".add(": "add", ".swap(": "swap",
              "withLora(": "withLora", "useLora(": "useLora"}
_ESCAPABLE = '()",.+-='
_NUMBER = re.compile(r"\d+\.\d*|\.\d+|\d+")
_ATTEND = re.compile(r"\.attend\(\s*(\++|-+|\d+\.\d*|\.\d+|\d+)\s*\)")
_WORD_END = set('()"') | {"\\"}


class _Node(NamedTuple):
    text: str  # a word (leaf) or "" for a group
    weight: float
    children: tuple = ()


def read_compel(prompt: str, strict: bool = False) -> WeightedPrompt:
    """Read ``prompt`` in compel's syntax (``strict`` changes nothing: compel has no repairs to refuse)."""
    del strict
    prompt = re.sub(r",(\S)", r", \1", prompt)
    _refuse_operators(prompt)
    reader = _Reader(prompt)
    nodes = reader.sequence(closer="")
    leaves: list[tuple[str, float]] = []
    _flatten(nodes, 1.0, leaves)
    fused: list[list] = []
    for text, weight in leaves:
        if fused and fused[-1][1] == weight:
            fused[-1][0] += " " + text
        else:
            fused.append([text, weight])
    fragments = [Fragment(text + (" " if index < len(fused) - 1 else ""), weight)
                 for index, (text, weight) in enumerate(fused)]
    return weighted_prompt(fragments, "compel")


def _flatten(nodes: list[_Node], scale: float, out: list[tuple[str, float]]) -> None:
    for node in nodes:
        if node.children or not node.text:
            _flatten(list(node.children), scale * node.weight, out)
        else:
            out.append((node.text, node.weight * scale))


class _Reader:
    """Recursive descent over one prompt; ``position`` moves past what each method reads."""

    def __init__(self, prompt: str):
        self.prompt = prompt
        self.position = 0

    def sequence(self, closer: str) -> list[_Node]:
        nodes: list[_Node] = []
        while self.position < len(self.prompt):
            char = self.prompt[self.position]
            if char.isspace():
                self.position += 1
            elif closer and char == closer:
                return nodes
            elif char in '("':
                nodes.append(self.operand(char))
            elif char == ")":
                raise PromptSyntaxError("unbalanced ')': no '(' is open", self.prompt, self.position)
            else:
                nodes.append(self.word())
        if closer:
            raise PromptSyntaxError(f"'{closer}' is never closed", self.prompt, len(self.prompt))
        return nodes

    def operand(self, opener: str) -> _Node:
        """``( ... )`` or ``" ... "``, then its weight if one is written right after."""
        column = self.position
        self.position += 1
        closer = ")" if opener == "(" else '"'
        try:
            children = self.sequence(closer)
        except PromptSyntaxError as error:
            if error.column == len(self.prompt):
                raise PromptSyntaxError(f"unbalanced '{opener}': it is never closed", self.prompt, column) from None
            raise
        self.position += 1
        return _Node("", self.suffix(numbers=True), tuple(children))

    def word(self) -> _Node:
        start = self.position
        text = []
        while self.position < len(self.prompt):
            char = self.prompt[self.position]
            if char == "\\" and self.prompt[self.position + 1 : self.position + 2] in tuple(_ESCAPABLE):
                text.append(self.prompt[self.position + 1])
                self.position += 2
                continue
            if char.isspace() or char in _WORD_END:
                break
            if char in "+-" and text and self.sign_run_ends_here():
                break
            text.append(char)
            self.position += 1
        if not text:
            raise PromptSyntaxError("expected a word", self.prompt, start)
        return _Node("".join(text), self.suffix(numbers=False))

    def sign_run_ends_here(self) -> bool:
        """A run of one sign that ends the word (at a space, the end, or syntax) is its weight."""
        end = self.position
        while end < len(self.prompt) and self.prompt[end] == self.prompt[self.position]:
            end += 1
        return end == len(self.prompt) or self.prompt[end].isspace() or self.prompt[end] in _ESCAPABLE

    def suffix(self, numbers: bool) -> float:
        """``+++`` / ``--`` / a number (after groups only) / ``.attend(w)``; 1.0 when none."""
        rest = self.prompt[self.position :]
        if attend := _ATTEND.match(rest):
            self.position += attend.end()
            return _weight_of(attend.group(1))
        sign = rest[:1]
        if sign in ("+", "-"):
            run = len(rest) - len(rest.lstrip(sign))
            self.position += run
            return _weight_of(sign * run)
        if numbers and (number := _NUMBER.match(rest)):
            self.position += number.end()
            return float(number.group(0))
        return 1.0


def _weight_of(literal: str) -> float:
    if literal[0] == "+":
        return PLUS_FACTOR ** len(literal)
    if literal[0] == "-":
        return MINUS_FACTOR ** len(literal)
    return float(literal)


def _refuse_operators(prompt: str) -> None:
    for spelling, name in _OPERATORS.items():
        column = prompt.find(spelling)
        if column != -1 and not prompt[:column].endswith("\\"):
            raise UnsupportedSyntaxError(f"compel's {name}() is not supported yet", prompt, column)

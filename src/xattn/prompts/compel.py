r"""The compel dialect: weights as compel (github.com/damian0815/compel) writes them.

What it reads (restated from compel's documented syntax; an independent implementation):

=====================================  ===============================================
``word+`` ``word++`` ``word-``         ×1.1 per ``+``, ×0.9 per ``-``, on that word
``(words)``                            a group: ×1.0 (unlike A1111's ×1.1)
``(words)1.3`` ``(words)++``           the group's weight, written right after ``)``
``"quoted words"++``                   the same for a quoted fragment
``(words).attend(1.3)``                the same, spelled out
``\(`` ``\)`` ``\"``                 the literal character (``\+ \- \, \. \=`` keep the backslash)
``("a cat", "a dog").blend(0.7, 0.3)`` a weighted sum of the prompts' embeddings (whole prompt only)
``("a cat", "a dog").and(1, 0.5)``     the prompts' embeddings one after the other (``.add()`` too)
``cat.swap(dog)``                      prompt-to-prompt: the embedding is the source's (``cat``)
=====================================  ===============================================

Weights multiply through nesting, outermost first, as compel multiplies
them. Neighbouring words of equal weight form one fragment; fragments are
joined with single spaces (compel also puts a space after every comma).
The operators are recorded on the result as a :class:`CompelOperator`
(``WeightedPrompt.operator``); :mod:`xattn.prompts.compel_encode` embeds
them in compel's formula. ``withLora()`` / ``useLora()`` raise
:class:`UnsupportedSyntaxError`, and so does any operator spelled where
compel would not read it: nothing becomes prompt text.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

from .types import (CompelOperator, CompelSwap, Fragment, PromptSyntaxError, UnsupportedSyntaxError, WeightedPrompt,
                    weighted_prompt)

PLUS_FACTOR = 1.1
MINUS_FACTOR = 0.9
_LORAS = {"withLora(": "withLora", "useLora(": "useLora"}
_OPERATOR_SPELLINGS = (".blend(", ".and(", ".add(", ".swap(")
_ESCAPABLE = '()",.+-='
_NUMBER = re.compile(r"\d+\.\d*|\.\d+|\d+")
_ATTEND = re.compile(r"\.attend\(\s*(\++|-+|\d+\.\d*|\.\d+|\d+)\s*\)")
_WHOLE = re.compile(r"\s*\((?P<inner>.*)\)\.(?P<kind>blend|and|add)\((?P<args>[^()]*)\)\s*", re.S)
_SWAP_KEYS = ("s_start", "s_end", "t_start", "t_end", "shape_freedom")
_SWAP_DEFAULTS = {"s_start": 0.0, "s_end": 0.0, "t_start": 0.2, "t_end": 1.0}
_WORD_END = set('()"') | {"\\"}


class _Node(NamedTuple):
    text: str  # a word (leaf) or "" for a group
    weight: float
    children: tuple = ()
    edited: tuple | None = None  # a .swap(): children are the original, edited the replacement
    options: tuple = ()


def read_compel(prompt: str, strict: bool = False) -> WeightedPrompt:
    """Read ``prompt`` in compel's syntax (``strict`` changes nothing: compel has no repairs to refuse)."""
    del strict
    prompt = re.sub(r",(\S)", r", \1", prompt)
    _refuse_loras(prompt)
    whole = _WHOLE.fullmatch(prompt)
    if whole and _balanced_prefix(whole.group("inner")):
        return _read_operator(prompt, whole)
    return _read_plain(prompt, prompt)


def _read_plain(prompt: str, shown: str, offset: int = 0) -> WeightedPrompt:
    reader = _Reader(prompt, shown, offset)
    items: list = []  # (text, weight) or (original list, edited list, options)
    _flatten(reader.sequence(closer=""), 1.0, items)
    source = _fragments([part for item in items for part in (item[0] if len(item) == 3 else [item])])
    swaps = [item for item in items if len(item) == 3]
    record = weighted_prompt(source, "compel")
    if not swaps:
        return record
    target = weighted_prompt(_fragments([part for item in items for part in (item[1] if len(item) == 3 else [item])]),
                             "compel")
    described = tuple(CompelSwap(" ".join(t for t, _ in original), " ".join(t for t, _ in edited), options)
                      for original, edited, options in swaps)
    return dataclasses.replace(record, operator=CompelOperator("swap", (dataclasses.replace(record), target),
                                                               swaps=described))


def _fragments(parts: list[tuple[str, float]]) -> list[Fragment]:
    return [Fragment(text + (" " if index < len(parts) - 1 else ""), weight) for index, (text, weight) in enumerate(parts)]


def _fuse(parts: list[tuple[str, float]]) -> list[tuple[str, float]]:
    fused: list[list] = []
    for text, weight in parts:
        if fused and fused[-1][1] == weight:
            fused[-1][0] += " " + text
        else:
            fused.append([text, weight])
    return [(text, weight) for text, weight in fused]


def _flatten(nodes: list[_Node], scale: float, out: list) -> None:
    """Leaves as compel flattens them: equal weights fused, but never across a ``.swap()``."""
    leaves: list[tuple[str, float]] = []

    def walk(items, factor):
        for node in items:
            if node.edited is not None:
                out.extend(_fuse(leaves))
                leaves.clear()
                original, edited = [], []
                _collect(list(node.children), factor, original)
                _collect(list(node.edited), factor, edited)
                out.append((_fuse(original) or [("", factor)], _fuse(edited) or [("", factor)], node.options))
            elif node.children or not node.text:
                walk(node.children, factor * node.weight)
            else:
                leaves.append((node.text, node.weight * factor))

    walk(nodes, scale)
    out.extend(_fuse(leaves))


def _collect(nodes: list[_Node], scale: float, out: list[tuple[str, float]]) -> None:
    for node in nodes:
        if node.children or not node.text:
            _collect(list(node.children), scale * node.weight, out)
        else:
            out.append((node.text, node.weight * scale))


def _read_operator(prompt: str, whole: re.Match) -> WeightedPrompt:
    """``(target, target, ...).blend(weights[, no_normalize])`` or ``.and(weights)`` / ``.add(weights)``."""
    kind, inner_at = whole.group("kind"), whole.start("inner")
    args = [arg.strip() for arg in whole.group("args").split(",")] if whole.group("args").strip() else []
    normalize = True
    if kind == "blend" and args and args[-1] == "no_normalize":
        normalize, args = False, args[:-1]
    weights = []
    for arg in args:
        try:
            weights.append(float(arg))
        except ValueError:
            raise PromptSyntaxError(f"compel's .{kind}() takes numbers, not {arg!r}", prompt,
                                    whole.start("args")) from None
    parts = []
    for text, start in _split_targets(whole.group("inner"), inner_at, prompt):
        parts.append(_read_plain(text, prompt, start))
    if weights and len(weights) != len(parts):
        raise PromptSyntaxError(f"compel's .{kind}() names {len(parts)} prompts and {len(weights)} weights",
                                prompt, whole.start("args"))
    weights = weights or [1.0] * len(parts)
    if kind == "blend":
        if any(part.operator is not None for part in parts):
            raise UnsupportedSyntaxError("compel cannot .swap() inside a .blend()", prompt, inner_at)
        first = parts[0]
        return dataclasses.replace(first, operator=CompelOperator("blend", tuple(parts), tuple(weights), normalize))
    fragments: list[Fragment] = []
    for index, part in enumerate(parts):
        if index:
            fragments.append(Fragment("", 1.0, is_break=True))
        pieces = list(part.fragments)
        if index < len(parts) - 1 and pieces:
            pieces[-1] = Fragment(pieces[-1].text + " ", pieces[-1].weight)
        fragments += pieces
    record = weighted_prompt(fragments, "compel")
    return dataclasses.replace(record, operator=CompelOperator("and", tuple(parts), tuple(weights)))


def _split_targets(inner: str, offset: int, prompt: str) -> list[tuple[str, int]]:
    """The comma-separated targets of a blend or conjunction: quoted prompts, groups or single words."""
    targets, start = [], 0
    for index, char, quoted, depth in _characters(inner + ","):  # the closing comma ends the last target
        if char == "," and not quoted and depth == 0:
            raw = inner[start:index]
            stripped = raw.strip()
            at = offset + start + len(raw) - len(raw.lstrip())
            if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
                targets.append((stripped[1:-1].replace('\\"', '"'), at + 1))
            elif len(stripped) >= 2 and stripped[0] == "(" and stripped[-1] == ")" and _balanced_prefix(stripped[1:-1]):
                targets.append((stripped[1:-1], at + 1))
            elif stripped and re.fullmatch(r"[^\s()\",.+]+(?:[-+][^\s()\",.+-]+)*", stripped):
                targets.append((stripped, at))
            else:
                raise PromptSyntaxError("each prompt of a compel .blend() / .and() is a \"quoted prompt\", a "
                                        "(group) or one word", prompt, at)
            start = index + 1
    return targets


def _balanced_prefix(text: str) -> bool:
    """True when ``text``'s parentheses (outside quotes, unescaped) balance and never go below zero."""
    depth, quoted = 0, False
    for _, _, quoted, depth in _characters(text):
        if depth < 0:
            return False
    return depth == 0 and not quoted


def _characters(text: str):
    """``(index, char, quoted, depth)`` of each unescaped character (a backslash and the character it escapes
    are skipped): whether it sits in a quote, and the parentheses open outside quotes once it is read."""
    depth, quoted, index = 0, False, 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        yield index, char, quoted, depth
        index += 1


class _Reader:
    """Recursive descent over one prompt; ``position`` moves past what each method reads."""

    def __init__(self, prompt: str, shown: str | None = None, offset: int = 0):
        self.prompt = prompt
        self.shown = prompt if shown is None else shown  # the whole prompt, for error messages
        self.offset = offset
        self.position = 0

    def error(self, reason: str, column: int, unsupported: bool = False) -> PromptSyntaxError:
        kind = UnsupportedSyntaxError if unsupported else PromptSyntaxError
        return kind(reason, self.shown, self.offset + column)

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
                raise self.error("unbalanced ')': no '(' is open", self.position)
            else:
                nodes.append(self.word())
        if closer:
            raise self.error(f"'{closer}' is never closed", len(self.prompt))
        return nodes

    def operand(self, opener: str) -> _Node:
        """``( ... )`` or ``" ... "``, then its weight, or a ``.swap()``, if one is written right after."""
        column = self.position
        self.position += 1
        closer = ")" if opener == "(" else '"'
        try:
            children = self.sequence(closer)
        except PromptSyntaxError as error:
            if error.column == self.offset + len(self.prompt):
                raise self.error(f"unbalanced '{opener}': it is never closed", column) from None
            raise
        self.position += 1
        if self.prompt.startswith(".swap(", self.position):
            return self.swap(tuple(children))
        return _Node("", self.suffix(numbers=True), tuple(children))

    def word(self) -> _Node:
        start = self.position
        text = []
        while self.position < len(self.prompt):
            char = self.prompt[self.position]
            if char == "\\" and self.prompt[self.position + 1 : self.position + 2] in tuple(_ESCAPABLE):
                escaped = self.prompt[self.position + 1]  # compel unescapes only ( ) "; \+ reaches CLIP as is
                text.append(escaped if escaped in '()"' else "\\" + escaped)
                self.position += 2
                continue
            if char.isspace() or char in _WORD_END:
                break
            if char == "." and (any(self.prompt.startswith(op, self.position) for op in _OPERATOR_SPELLINGS[:3])
                                or (not text and (self.prompt.startswith(".swap(", self.position)
                                                  or _ATTEND.match(self.prompt, self.position)))):
                raise self.error(f"compel reads {self.prompt[self.position:].split('(')[0]}() only after a target "
                                 "(and .blend() / .and() only around the whole prompt)", self.position)
            if char in "+-" and text and self.sign_run_ends_here():
                break
            if char == "." and text and (self.prompt.startswith(".swap(", self.position)
                                         or _ATTEND.match(self.prompt, self.position)):
                break
            text.append(char)
            self.position += 1
        if not text:
            raise self.error("expected a word", start)
        if self.prompt.startswith(".swap(", self.position):
            return self.swap((_Node("".join(text), 1.0),))
        return _Node("".join(text), self.suffix(numbers=False))

    def swap(self, original: tuple) -> _Node:
        """``.swap(replacement[, s_start=..., t_end=..., shape_freedom=...])`` after a target."""
        column = self.position
        self.position += len(".swap(")
        depth, quoted, end, comma = 0, False, self.position, None
        while end < len(self.prompt):
            char = self.prompt[end]
            if char == "\\":
                end += 2
                continue
            if char == '"':
                quoted = not quoted
            elif not quoted and char == "(":
                depth += 1
            elif not quoted and char == ")":
                if depth == 0:
                    break
                depth -= 1
            elif not quoted and char == "," and depth == 0 and comma is None:
                comma = end
            end += 1
        if end >= len(self.prompt):
            raise self.error("compel's .swap( is never closed", column)
        replacement = self.prompt[self.position : comma if comma is not None else end]
        inner = _Reader(replacement, self.shown, self.offset + self.position)
        edited = inner.sequence(closer="")
        if any(_has_swap(node) for node in edited):
            raise self.error("a .swap() inside a .swap() replacement", column, unsupported=True)
        given: dict[str, float] = {}
        for item in (self.prompt[comma + 1 : end].split(",") if comma is not None else []):
            key, _, value = item.partition("=")
            try:
                if key.strip() not in _SWAP_KEYS:
                    raise ValueError
                given[key.strip()] = float(value)
            except ValueError:
                raise self.error(f"compel's .swap() options are {', '.join(_SWAP_KEYS)} with numbers, not "
                                 f"{item.strip()!r}", comma + 1) from None
        options = dict(_SWAP_DEFAULTS)
        if "shape_freedom" in given:  # compel: high freedom leaves the shape alone (s_end near 0)
            options["s_end"] = 1.0 - given.pop("shape_freedom") ** (1.0 / 3.0)
        options.update(given)
        self.position = end + 1
        return _Node("", 1.0, original, tuple(edited), tuple(sorted(options.items())))

    def sign_run_ends_here(self) -> bool:
        """compel keeps a sign in a word only when a plain character follows it (``x-ray``); a sign before
        a space, the end, syntax or another sign (``cat--:``) ends the word, and its run is the weight."""
        following = self.prompt[self.position + 1 : self.position + 2]
        return not following or following.isspace() or following in _ESCAPABLE

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
            weight = _weight_of(sign * run)
        elif numbers and (number := _NUMBER.match(rest)):
            self.position += number.end()
            weight = float(number.group(0))
        else:
            return 1.0
        if self.prompt.startswith(".swap(", self.position):
            raise self.error("compel reads no .swap() after a weight; put the weight inside", self.position)
        return weight


def _has_swap(node: _Node) -> bool:
    return node.edited is not None or any(_has_swap(child) for child in node.children)


def _weight_of(literal: str) -> float:
    if literal[0] == "+":
        return PLUS_FACTOR ** len(literal)
    if literal[0] == "-":
        return MINUS_FACTOR ** len(literal)
    return float(literal)


def _refuse_loras(prompt: str) -> None:
    for spelling, name in _LORAS.items():
        column = prompt.find(spelling)
        if column != -1 and not prompt[:column].endswith("\\"):
            raise UnsupportedSyntaxError(f"compel's {name}() is not supported yet (load the LoRA with "
                                         "--lora-dir and an A1111 <lora:name:weight> tag)", prompt, column)

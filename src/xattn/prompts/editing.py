r"""A1111's prompt editing and alternation: one written prompt -> a step schedule of plain prompts.

The rules, restated from A1111's documentation (the wiki's "Prompt editing" and
"Alternating words", and the docstring examples of its
``get_learned_conditioning_prompt_schedules``); this is an independent implementation:

* ``[from:to:when]`` is ``from`` up to step ``when``, then ``to``; ``[to:when]``
  adds ``to`` after ``when`` (nothing before); ``[from::when]`` removes ``from``
  after ``when``. Constructs nest: ``a[b:[c:d:2]:1]e``.
* ``when`` is a number (optional spaces around it). Written with a ``.`` it is a
  fraction of the step count (``0.5``, ``.25``; ``1.5`` is 1.5 × the steps, so all of
  them); written without, a step number (``3``, ``1e1``). Either way the boundary
  is ``min(steps, int(value))`` (truncated), and only boundaries ``>= 1`` are kept.
* ``[a|b|c]`` alternates: ``a`` while the step counter is 1, ``b`` at 2, ``c`` at 3,
  ``a`` at 4 ... (an empty option is the empty text: ``[fe|]male``).
* The schedule is a list of ``(until, text)``: one entry at each boundary of any
  construct (every step ``1..steps`` when the prompt alternates) and at ``steps``,
  each with the text every construct gives at that boundary. A denoising step
  ``i`` (counted from 0, as A1111's sampler counts) uses the first entry with
  ``i <= until`` (:func:`text_at`). So ``[a:b:2]`` is ``a`` at steps 0, 1 and 2.
* The texts keep their attention syntax (``(b:1.1)``); each is then read by the
  attention rules (:func:`xattn.prompts.parse_attention`) and encoded on its own.
* Outside a construct, brackets and colons that do not form one are text, as is
  ``|``. A ``[`` is read as alternation when it can be, else as editing or
  emphasis with ``|`` as text (``a [{b|d{:.5] c`` edits ``{b|d{``). A prompt that
  ends in a lone backslash has no schedule (A1111's grammar fails on it, and then
  A1111 uses the prompt as written at every step).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import NamedTuple, Union

_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?)")
_PLAIN_STOP = set("\\[]():|")
MAX_SUB_PROMPTS = 256  # sub_prompts() refuses prompts whose constructs combine into more texts


class ScheduleEntry(NamedTuple):
    """One entry of a schedule: ``text`` is used while the step counter is at most ``until``."""

    until: int
    text: str


@dataclass(frozen=True)
class _Edit:
    before: tuple | None  # None: [to:when]
    after: tuple
    number: str  # as written: "0.5", "3"


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # of node tuples


_Node = Union[str, _Edit, _Alternate]


class _Fail(Exception):
    pass


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def top(self) -> list[_Node]:
        nodes: list[_Node] = []
        while self.pos < len(self.text):
            char = self.peek()
            if char in "[(":
                start = self.pos
                try:
                    nodes += self.construct(bar_text=True)
                    continue
                except _Fail:
                    self.pos = start + 1
                    nodes.append(char)
            elif char in "]):|":
                nodes.append(char)
                self.pos += 1
            else:
                nodes.append(self.plain(bar_text=True))  # a lone backslash at the end raises _Fail
        return nodes

    def plain(self, bar_text: bool) -> str:
        start = self.pos
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\":
                if self.pos + 1 >= len(self.text):
                    raise _Fail
                self.pos += 2
            elif char in _PLAIN_STOP and not (bar_text and char == "|"):
                break
            else:
                self.pos += 1
        return self.text[start : self.pos]

    def prompt(self, bar_text: bool) -> list[_Node]:
        nodes: list[_Node] = []
        while self.pos < len(self.text):
            char = self.peek()
            if char in "[(":
                nodes += self.construct(bar_text)
            elif char in "]):" or (char == "|" and not bar_text):
                break
            else:
                nodes.append(self.plain(bar_text))
        return nodes

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _Fail
        self.pos += 1

    def construct(self, bar_text: bool) -> list[_Node]:
        if self.peek() == "(":
            self.pos += 1
            first = self.prompt(bar_text=True)
            if self.peek() == ")":
                self.pos += 1
                return ["(", *first, ")"]
            self.expect(":")
            second = self.prompt(bar_text=True)
            self.expect(")")
            return ["(", *first, ":", *second, ")"]
        start = self.pos
        try:
            return self.bracket(bar_text=False)  # alternation where it can be one
        except _Fail:
            self.pos = start
            return self.bracket(bar_text=True)

    def bracket(self, bar_text: bool) -> list[_Node]:
        self.expect("[")
        first = self.prompt(bar_text)
        char = self.peek()
        if char == "]":
            self.pos += 1
            return ["[", *first, "]"]
        if char == "|" and not bar_text:
            options = [tuple(first)]
            while self.peek() == "|":
                self.pos += 1
                options.append(tuple(self.prompt(bar_text=False)))
            self.expect("]")
            return [_Alternate(tuple(options))]
        self.expect(":")
        start = self.pos
        number = self.number_and_close()
        if number is not None:
            return [_Edit(None, tuple(first), number)]
        self.pos = start
        second = self.prompt(bar_text)
        self.expect(":")
        number = self.number_and_close()
        if number is None:
            raise _Fail
        return [_Edit(tuple(first), tuple(second), number)]

    def number_and_close(self) -> str | None:
        """``[spaces] NUMBER [spaces] ]`` at the cursor: the number (cursor after ``]``), else None."""
        position = _skip_spaces(self.text, self.pos)
        match = _NUMBER.match(self.text, position)
        if not match:
            return None
        close = _skip_spaces(self.text, match.end())
        if close >= len(self.text) or self.text[close] != "]":
            return None
        self.pos = close + 1
        return match.group(0)


def _skip_spaces(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _parse(prompt: str) -> list[_Node] | None:
    """The prompt's nodes, or None where A1111's grammar fails (then the prompt has no schedule)."""
    try:
        return _Parser(prompt).top()
    except _Fail:
        return None


def _walk(nodes):
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _walk(node.before or ())
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def has_schedule(prompt: str) -> bool:
    """True when ``prompt`` holds prompt editing or alternation that A1111 would schedule."""
    nodes = _parse(prompt)
    return nodes is not None and any(True for _ in _walk(nodes))


def boundary(number: str, steps: int) -> int:
    """The step a ``when`` written as ``number`` stands for, in a run of ``steps`` steps."""
    value = float(number) * steps if "." in number else float(number)
    return min(steps, int(value))


def _text(nodes, step: int, steps: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            branch = (node.before or ()) if step <= boundary(node.number, steps) else node.after
            parts.append(_text(branch, step, steps))
        else:
            parts.append(_text(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(parts)


def parse_schedule(prompt: str, steps: int) -> list[ScheduleEntry]:
    """A1111's schedule of ``prompt`` over ``steps`` steps: ``[(until, text), ...]``, the last ``until`` = ``steps``.

    >>> parse_schedule("a [b:c:0.5] d", 4)
    [ScheduleEntry(until=2, text='a b d'), ScheduleEntry(until=4, text='a c d')]
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"a schedule needs at least one step, not {steps}")
    nodes = _parse(prompt)
    if nodes is None:
        return [ScheduleEntry(steps, prompt)]
    boundaries = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Alternate):
            boundaries.update(range(1, steps + 1))
        elif (when := boundary(node.number, steps)) >= 1:
            boundaries.add(when)
    return [ScheduleEntry(until, _text(nodes, until, steps)) for until in sorted(boundaries)]


def text_at(schedule: list[ScheduleEntry], step: int) -> str:
    """The text of denoising step ``step`` (0-based): the first entry with ``step <= until``, as A1111 picks it."""
    return next((entry.text for entry in schedule if step <= entry.until), schedule[0].text)


def texts_by_step(prompt: str, steps: int) -> list[str]:
    """The text at each step ``0 .. steps-1``."""
    schedule = parse_schedule(prompt, steps)
    return [text_at(schedule, step) for step in range(steps)]


def sub_prompts(prompt: str) -> list[str]:
    """Every text the prompt's constructs can give (for any step count), first choices first, without repeats.

    Each editing construct gives its ``from`` or its ``to``, each alternation one of
    its options. Raises ``ValueError`` past :data:`MAX_SUB_PROMPTS` combinations.
    """
    nodes = _parse(prompt)
    if nodes is None:
        return [prompt]
    texts: list[str] = []
    for text in _combinations(tuple(nodes)):
        if text not in texts:
            texts.append(text)
            if len(texts) > MAX_SUB_PROMPTS:
                raise ValueError(f"the prompt's editing and alternation give more than {MAX_SUB_PROMPTS} texts")
    return texts


def _combinations(nodes: tuple):
    choices = []
    for node in nodes:
        if isinstance(node, str):
            choices.append([node])
        elif isinstance(node, _Edit):
            choices.append(list(_combinations(node.before or ())) + list(_combinations(node.after)))
        else:
            choices.append([text for option in node.options for text in _combinations(option)])
    for picked in itertools.product(*choices):
        yield "".join(picked)

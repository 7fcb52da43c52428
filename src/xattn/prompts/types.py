"""What every prompt dialect compiles to: clean text, weighted spans, the fragments an encoder sees.

A dialect (``a1111``, ``compel``) reads a prompt as people write it and
returns a :class:`WeightedPrompt`; the reweighting controller, the long-prompt
encoder and the CLI only ever read that record, never the syntax.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from ..errors import XattnError

NEAR_ONE = 1e-9  # a span weight this close to 1 is 1: ``([a])`` is plain ``a``

# A word for ``WeightedPrompt.weights``: letters, digits and ``_``, joined by inner ``-``, ``+`` or ``'``.
_WORD = regex.compile(r"[\p{L}\p{N}_]+(?:[-+']+[\p{L}\p{N}_]+)*")


class PromptSyntaxError(XattnError, ValueError):
    """A prompt its dialect cannot read; ``column`` (0-based) is where, shown with a caret."""

    def __init__(self, reason: str, prompt: str, column: int):
        self.reason = reason
        self.prompt = prompt
        self.column = column
        super().__init__(f"{reason} (column {column})\n{caret_picture(prompt, column)}")


class UnsupportedSyntaxError(PromptSyntaxError):
    """Syntax the dialect defines but xattn does not run yet (AND, ``.blend()``...)."""


class ScheduledPromptError(UnsupportedSyntaxError):
    """A prompt with A1111's prompt editing or alternation: a step schedule, not one weighted prompt.

    Run it with :class:`xattn.prompts.PromptSchedule` (the CLI's ``generate`` does);
    :func:`xattn.prompts.parse_schedule` reads its texts.
    """


@dataclass(frozen=True)
class WeightedSpan:
    """Characters ``[start, end)`` of the clean prompt and their weight."""

    text: str  # the word(s) as they appear in the clean prompt, e.g. "red circle"
    start: int
    end: int
    weight: float


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text with one weight, as the dialect hands it to the encoder.

    A1111 and compel tokenize fragment by fragment, so ``a (red)dish`` is
    ``red`` + ``dish``, not ``reddish``. ``start`` is the fragment's offset in
    the clean text. A chunk break (A1111's ``BREAK``) is a fragment with
    ``is_break`` set and no clean text.
    """

    text: str
    weight: float
    start: int = 0
    is_break: bool = False


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt with its syntax removed.

    ``text`` is what a plain tokenizer should see; ``spans`` say which parts
    carry a weight other than 1; ``fragments`` are the pieces (and chunk
    breaks) in the order the dialect's own encoder tokenizes them.
    """

    text: str
    spans: tuple[WeightedSpan, ...]
    fragments: tuple[Fragment, ...] = ()
    syntax: str = "a1111"
    operator: CompelOperator | None = None  # compel's .blend() / .and() / .swap(); None for a plain prompt

    @property
    def breaks(self) -> tuple[int, ...]:
        """Offsets in ``text`` where a ``BREAK`` starts a new 75-token chunk."""
        return tuple(fragment.start for fragment in self.fragments if fragment.is_break)

    def weights(self) -> dict[str, float]:
        """Word -> weight for every word that lies wholly inside a span.

        A group is split into its words: ``(red circle:1.3)`` gives
        ``{"red": 1.3, "circle": 1.3}``. A repeated word is keyed by
        occurrence over the whole clean prompt, ignoring case: the first is
        ``"red"``, the second ``"red#2"`` (so in ``red and (red:2)`` the
        weighted word is ``"red#2"``), as :meth:`xattn.TokenMap.indices` reads
        them. A word only partly inside a span (``(red)dish``) is left out.
        """
        result: dict[str, float] = {}
        occurrences: dict[str, int] = {}
        for match in _WORD.finditer(self.text):
            word, start, end = match.group(0), match.start(), match.end()
            count = occurrences[word.lower()] = occurrences.get(word.lower(), 0) + 1
            span = next((s for s in self.spans if s.start <= start and end <= s.end), None)
            if span is not None:
                result[word if count == 1 else f"{word}#{count}"] = span.weight
        return result


@dataclass(frozen=True)
class CompelSwap:
    """One compel ``.swap()``: the words it replaces, their replacement, compel's step options.

    ``options`` are compel's, as ``(name, value)`` pairs: ``s_start``/``s_end`` (self-attention) and
    ``t_start``/``t_end`` (cross-attention), as fractions of the steps (``shape_freedom`` already turned
    into ``s_end`` as compel turns it).
    """

    original: str
    edited: str
    options: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class CompelOperator:
    """compel's operators on a parsed prompt (``WeightedPrompt.operator``).

    ``kind`` is ``"blend"`` (a weighted sum of the ``parts``' embeddings, ``weights`` divided by their sum
    unless ``normalize`` is off), ``"and"`` (the parts' embeddings one after the other, each moved away
    from the empty prompt's by its weight) or ``"swap"`` (``parts`` is ``(source, target)``: compel embeds
    the source; ``swaps`` says what is replaced). The record's own text and fragments are the first
    part's (blend), all parts with a chunk break between them (and), or the source's (swap).
    """

    kind: str
    parts: tuple[WeightedPrompt, ...]
    weights: tuple[float, ...] = ()
    normalize: bool = True
    swaps: tuple[CompelSwap, ...] = ()

    def as_edit(self) -> CompelEdit:
        """A ``.swap()`` as an xattn prompt-to-prompt edit: compel-dialect source and target, step windows.

        compel's ``t_start:t_end`` becomes the cross-attention window and ``s_start:s_end`` the
        self-attention window (``None`` when empty); compel itself honours the first swap's options.
        """
        if self.kind != "swap":
            raise UnsupportedSyntaxError(f"only a compel .swap() is an edit, not a .{self.kind}()", self.parts[0].text, 0)
        options = dict(self.swaps[0].options)
        self_window = f"{options['s_start']}:{options['s_end']}" if options["s_end"] > options["s_start"] else None
        return CompelEdit(compel_text(self.parts[0]), compel_text(self.parts[1]),
                          f"{options['t_start']}:{options['t_end']}", self_window)


@dataclass(frozen=True)
class CompelEdit:
    """What :meth:`CompelOperator.as_edit` gives: ``xattn.edit.edit(pipe, e.source, e.target, **e.options())``."""

    source: str
    target: str
    cross_steps: str
    self_steps: str | None

    def options(self) -> dict:
        return {"syntax": "compel", "cross_steps": self.cross_steps, "self_steps": self.self_steps}


def compel_text(prompt: WeightedPrompt) -> str:
    """A parsed prompt written back in compel's dialect: plain fragments as text, weighted ones as ``(text)w``."""
    out = []
    for fragment in prompt.fragments:
        text = regex.sub(r'([()"])', r"\\\1", fragment.text.strip())
        text = regex.sub(r"(?<!\\)([+-])(?=\s|$)", r"\\\1", text)  # a sign ending a word is a weight
        if text:
            weight = f"{fragment.weight:.12f}".rstrip("0").rstrip(".")  # compel reads no exponent
            out.append(text if fragment.weight == 1 else f"({text}){weight}")
    return " ".join(out)


def weighted_prompt(fragments: list[Fragment], syntax: str) -> WeightedPrompt:
    """The record for a list of ``(text, weight)`` fragments and breaks, with offsets and spans filled in."""
    placed, position = [], 0
    for fragment in fragments:
        placed.append(Fragment(fragment.text if not fragment.is_break else "", fragment.weight, position,
                               fragment.is_break))
        position += 0 if fragment.is_break else len(fragment.text)
    text = "".join(fragment.text for fragment in placed)
    return WeightedPrompt(text, _spans(text, placed), tuple(placed), syntax)


def _spans(text: str, fragments: list[Fragment]) -> tuple[WeightedSpan, ...]:
    """Runs of equal weight other than 1, whitespace trimmed from both ends; breaks do not split runs."""
    runs: list[list] = []  # [start, end, weight]
    for fragment in fragments:
        if fragment.is_break or not fragment.text:
            continue
        weight = 1.0 if abs(fragment.weight - 1.0) <= NEAR_ONE else fragment.weight
        end = fragment.start + len(fragment.text)
        if runs and runs[-1][2] == weight and runs[-1][1] == fragment.start:
            runs[-1][1] = end
        else:
            runs.append([fragment.start, end, weight])
    spans = []
    for start, end, weight in runs:
        if weight == 1.0:
            continue
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < end:
            spans.append(WeightedSpan(text[start:end], start, end, weight))
    return tuple(spans)


def caret_picture(prompt: str, column: int) -> str:
    """The line of ``prompt`` holding ``column``, with a caret under that column."""
    line_start = prompt.rfind("\n", 0, column) + 1
    line_end = prompt.find("\n", column)
    if line_end == -1:
        line_end = len(prompt)
    line = "".join(" " if char.isspace() else char for char in prompt[line_start:line_end])
    return f"  {line}\n  {' ' * (column - line_start)}^"

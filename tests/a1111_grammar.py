r"""A hypothesis grammar of A1111 prompts and a reference evaluator written over the structure.

The strategy draws a *structure* (text, BREAK, escapes, stray backslashes,
colons that are text, stray closers, groups closed, weighted or left open),
renders it to a prompt string, and states independently what every character
must weigh, following A1111's documented rules:

* a closed ``( )`` multiplies by 1.1 (or by its ``:number``), ``[ ]`` by 1/1.1;
  groups close inner first, so their factors apply inner first;
* groups left open act to the end and are applied after every closed one:
  the open ``(`` first, then the open ``[``, each outermost first;
* ``BREAK`` in plain text, and the whitespace around it within that run of
  text, is a chunk break, marked with weight -1; inside brackets the mark's
  weight is multiplied and it is then the word ``BREAK`` unless it stays -1;
* escapes give their character, a backslash before anything else gives nothing.

The evaluator walks the structure recursively; it shares no code with the parser.
"""

from __future__ import annotations

from hypothesis import strategies as st

BREAK_ITEM = "<BREAK>"
LETTERS = "abcxyzé"
TEXT = st.text(alphabet=LETTERS + " ,.-+|\n0123456789", min_size=1, max_size=6)
WEIGHTS = st.one_of(
    st.sampled_from(["1.5", ".5", "2.", "-1", "+1.3", "0", "1", "007", " 1.2 ", "\t2", "٣.٥", "1.1", "0.9"]),
    st.floats(min_value=-4, max_value=4, allow_nan=False).map(lambda x: f"{x:.3f}"),
)
MAX_DEPTH = 3


@st.composite
def a1111_structure(draw, depth=0, round_open=False, square_open=False, tail=True):
    """A list of nodes; groups left open only at the end of the root or of another open group."""
    kinds = ["text", "text", "break", "escape", "lone", "colon"]
    if not round_open:
        kinds += ["stray)", "stray_weight"]
    if not square_open:
        kinds.append("stray]")
    if depth < MAX_DEPTH:
        kinds += ["round", "round", "square"]
    nodes = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind == "text":
            nodes.append(("text", draw(TEXT)))
        elif kind == "break":
            nodes.append(("break",))
        elif kind == "escape":
            nodes.append(("escape", draw(st.sampled_from("()[]\\"))))
        elif kind == "lone":
            nodes.append(("lone", draw(st.sampled_from("mq/é"))))
        elif kind == "colon":
            nodes.append(("colon", draw(st.sampled_from([":nixeu", ":1e1", ": photo", ":x"]))))
        elif kind == "stray)":
            nodes.append(("stray", ")"))
        elif kind == "stray]":
            nodes.append(("stray", "]"))
        elif kind == "stray_weight":
            nodes.append(("stray", ":1.5)"))
        elif kind == "round":
            children = draw(a1111_structure(depth + 1, True, square_open, False))
            nodes.append(("round", children, draw(st.one_of(st.none(), WEIGHTS)), True))
        else:
            children = draw(a1111_structure(depth + 1, round_open, True, False))
            nodes.append(("square", children, None, True))
    if tail and depth < MAX_DEPTH and draw(st.booleans()):
        bracket = draw(st.sampled_from(["round", "square"]))
        children = draw(a1111_structure(depth + 1, round_open or bracket == "round",
                                        square_open or bracket == "square", True))
        nodes.append((bracket, children, None, False))
    return nodes


def render(nodes) -> str:
    """The prompt string a structure stands for."""
    out = []
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "break":
            out.append(" BREAK ")
        elif kind == "escape":
            out.append("\\" + node[1])
        elif kind == "lone":
            out.append("\\" + node[1])
        elif kind in ("colon", "stray"):
            out.append(node[1])
        else:
            _, children, weight, closed = node
            opener, closer = ("(", ")") if kind == "round" else ("[", "]")
            ending = f":{weight})" if weight is not None else closer if closed else ""
            out.append(opener + render(children) + ending)
    return "".join(out)


def expected_items(nodes) -> list[tuple[str, float | None]]:
    """What the encoder must see: ``(character, weight)`` and ``(BREAK_ITEM, None)`` for each chunk break."""
    marked = _evaluate(nodes, closed=(), open_round=(), open_square=())
    items = []
    for char, weight in marked:
        if char == BREAK_ITEM and weight == -1:
            items.append((BREAK_ITEM, None))
        elif char == BREAK_ITEM:
            items += [(letter, weight) for letter in "BREAK"]
        else:
            items.append((char, weight))
    return items


def _evaluate(nodes, closed, open_round, open_square):
    """Characters and BREAK marks with their weights; ``closed`` lists factors innermost first."""

    def weigh(start):
        weight = start
        for factor in (*closed, *open_round, *open_square):
            weight *= factor
        return weight

    out, segment = [], []
    for node in [*nodes, None]:
        if node is not None and node[0] in ("text", "break"):
            segment.append(node)
            continue
        out += [(char, weigh(-1.0 if char == BREAK_ITEM else 1.0)) for char in _segment_chars(segment)]
        segment = []
        if node is None:
            break
        kind = node[0]
        if kind == "escape":
            out.append((node[1], weigh(1.0)))
        elif kind == "lone":
            out.append((node[1], weigh(1.0)))  # the backslash gives nothing, the character is text
        elif kind in ("colon", "stray"):
            out += [(char, weigh(1.0)) for char in node[1]]
        else:
            _, children, weight, is_closed = node
            if is_closed:
                factor = float(weight) if weight is not None else 1.1 if kind == "round" else 1 / 1.1
                out += _evaluate(children, (factor, *closed), open_round, open_square)
            elif kind == "round":
                out += _evaluate(children, closed, (*open_round, 1.1), open_square)
            else:
                out += _evaluate(children, closed, open_round, (*open_square, 1 / 1.1))
    return out


def _segment_chars(segment) -> list[str]:
    """A run of plain text with BREAK marks; each mark swallows the whitespace next to it."""
    chars = []
    for node in segment:
        chars += list(node[1]) if node[0] == "text" else [BREAK_ITEM]
    keep = [True] * len(chars)
    for index, char in enumerate(chars):
        if char != BREAK_ITEM:
            continue
        for step in (-1, 1):
            other = index + step
            while 0 <= other < len(chars) and chars[other] != BREAK_ITEM and chars[other].isspace():
                keep[other] = False
                other += step
    return [char for char, kept in zip(chars, keep) if kept]

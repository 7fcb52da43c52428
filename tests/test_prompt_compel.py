"""The compel dialect of xattn.prompts, with compel itself (PyPI, the ``test`` extra) as the oracle."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xattn.errors import XattnError
from xattn.prompts import PromptSyntaxError, UnsupportedSyntaxError, parse_prompt

# compel's documented examples (its README and syntax guide), weights by its rules: + is x1.1, - is x0.9.
DOCUMENTED = [
    ("a cat playing with a ball++ in the forest", {"ball": 1.1**2}),
    ("a cat playing with a ball-- in the forest", {"ball": 0.9**2}),
    ("a (cat playing with a ball)++ in the forest", dict.fromkeys(["cat", "playing", "with", "a#2", "ball"], 1.1**2)),
    ("a tall thin man (picking apricots)1.3", {"picking": 1.3, "apricots": 1.3}),
    ("(a tall thin man)0.5 picking apricots", {"a": 0.5, "tall": 0.5, "thin": 0.5, "man": 0.5}),
    ('a "cat playing"++ with a ball', {"cat": 1.1**2, "playing": 1.1**2}),
    ("a (cat) playing", {}),  # plain parentheses group without weighting, unlike A1111's x1.1
    ("a (cat).attend(1.5) playing", {"cat": 1.5}),
    ("((a cat)1.5 playing)0.5", {"a": 0.75, "cat": 0.75, "playing": 0.5}),
    ("x-ray+ of a hand", {"x-ray": 1.1}),
    (r"a \(cat\) playing", {}),
]


@pytest.mark.parametrize(("source", "expected"), DOCUMENTED, ids=[case[0] for case in DOCUMENTED])
def test_documented_examples(source, expected):
    weights = parse_prompt(source, syntax="compel").weights()
    assert weights.keys() == expected.keys()
    for word, weight in expected.items():
        assert weights[word] == pytest.approx(weight, rel=1e-12)


@pytest.mark.parametrize(("source", "operator", "text"), [
    ('("a cat", "a dog").blend(0.5, 0.5)', "blend", "a cat"),
    ('("a cat playing", "in the forest").and()', "and", "a cat playing in the forest"),
    ('("a cat", "a dog").add(1, 0.5)', "and", "a cat a dog"),
    ("a cat.swap(dog) playing", "swap", "a cat playing"),
    ("a (tall man).swap(short woman)", "swap", "a tall man"),
])
def test_operators_are_read_never_become_text(source, operator, text):
    parsed = parse_prompt(source, syntax="compel")
    assert parsed.operator.kind == operator and parsed.text == text  # the operators' embeddings: test_prompt_compel_*


def test_loras_raise_a_named_error_never_become_text():
    with pytest.raises(UnsupportedSyntaxError, match="compel's withLora\\(\\) is not supported yet") as caught:
        parse_prompt("withLora(film, 0.8) a cat", syntax="compel")
    assert isinstance(caught.value, XattnError)


def test_unbalanced_parenthesis_is_an_error():
    with pytest.raises(PromptSyntaxError, match="never closed"):
        parse_prompt("a (cat playing", syntax="compel")


# -- differential: compel's own parser on generated prompts -------------------------

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=5)
SIGNS = st.one_of(st.just(""), st.integers(1, 3).map(lambda n: "+" * n), st.integers(1, 3).map(lambda n: "-" * n))
GROUP_WEIGHT = st.one_of(SIGNS, st.sampled_from(["1.3", "0.5", "2", ".5", "1.25", "0"]))
SEPARATOR = st.sampled_from([" ", ", ", "  "])


@st.composite
def compel_prompt(draw, depth=0, quoted=False):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["word", "word", "group", "quoted"] if depth < 2 and not quoted else ["word"]))
        if kind == "word":
            part = draw(WORD) + draw(SIGNS)
        elif kind == "group":
            part = "(" + draw(compel_prompt(depth + 1)) + ")" + draw(GROUP_WEIGHT)
        else:
            part = '"' + draw(compel_prompt(depth + 1, quoted=True)) + '"' + draw(GROUP_WEIGHT)
        parts.append(part)
    separators = [draw(SEPARATOR) for _ in parts[1:]]
    return parts[0] + "".join(sep + part for sep, part in zip(separators, parts[1:]))


def _word_weights(fragments) -> list[tuple[str, float]]:
    return [(word, weight) for text, weight in fragments for word in re.findall(r"[a-z]+", text)]


@settings(max_examples=150, deadline=None)
@given(compel_prompt())
def test_per_word_weights_equal_compels(prompt):
    compel_parser = pytest.importorskip("compel.prompt_parser")
    oracle = compel_parser.PromptParser().parse_conjunction(prompt).prompts[0].children
    expected = _word_weights([(fragment.text, fragment.weight) for fragment in oracle])
    got = _word_weights([(f.text, f.weight) for f in parse_prompt(prompt, syntax="compel").fragments])
    assert [word for word, _ in got] == [word for word, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12, abs=0)


@pytest.mark.parametrize("mode", ["scale", "bias", "embedding"])
def test_compel_prompts_drive_every_reweight_mode(mode):
    from xattn import Reweight

    reweight = Reweight.from_prompt("a red++ circle and a (blue square)0.5", mode=mode, syntax="compel")
    assert reweight.prompt == "a red circle and a blue square"
    assert [(s.text, s.weight) for s in reweight.spans] == [("red", pytest.approx(1.21)), ("blue square", 0.5)]

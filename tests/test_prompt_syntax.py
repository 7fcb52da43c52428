"""Tests for xattn.prompt_syntax: the A1111/compel weighted-prompt parser.

Expected weights are derived by hand from the rules in the module docstring:
``(w)`` ×1.1, ``[w]`` ÷1.1, ``w+`` ×1.1, ``w-`` ×0.9, explicit numbers as
written, and nesting multiplies.
"""

from __future__ import annotations

import math
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xattn.prompt_syntax import PromptSyntaxError, WeightedPrompt, WeightedSpan, parse_prompt

UP = 1.1  # ( ) and +
DOWN_BRACKET = 1 / 1.1  # [ ]
DOWN_MINUS = 0.9  # -


def spans_of(prompt: WeightedPrompt) -> list[tuple[str, float]]:
    return [(span.text, span.weight) for span in prompt.spans]


def assert_spans(actual: WeightedPrompt, expected: list[tuple[str, float]]) -> None:
    got = spans_of(actual)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


# (prompt, clean text, [(span text, weight), ...])
VALID_CASES = [
    # plain text
    ("a red circle", "a red circle", []),
    ("", "", []),
    ("   ", "   ", []),
    # A1111 explicit weights
    ("a (red:1.5) circle", "a red circle", [("red", 1.5)]),
    ("(red circle:1.3)", "red circle", [("red circle", 1.3)]),
    ("(red:-1)", "red", [("red", -1.0)]),
    ("(red:.5)", "red", [("red", 0.5)]),
    ("(red:2.)", "red", [("red", 2.0)]),
    ("(red:+1.5)", "red", [("red", 1.5)]),
    ("(red:0)", "red", [("red", 0.0)]),
    ("(red: 1.5 )", "red", [("red", 1.5)]),
    ("(red :2)", "red ", [("red", 2.0)]),  # the space before ':' is group content
    ("(red:1)", "red", []),  # weight 1 is not listed
    # A1111 parentheses and brackets
    ("a (red) circle", "a red circle", [("red", UP)]),
    ("((red))", "red", [("red", UP**2)]),
    ("(((red)))", "red", [("red", UP**3)]),
    ("[red]", "red", [("red", DOWN_BRACKET)]),
    ("[[red]]", "red", [("red", DOWN_BRACKET**2)]),
    ("((red:1.5) circle)", "red circle", [("red", 1.5 * UP), ("circle", UP)]),
    ("((red circle):2)", "red circle", [("red circle", 2 * UP)]),
    ("[(red:2)]", "red", [("red", 2 * DOWN_BRACKET)]),
    ("([red])", "red", []),  # ×1.1 ÷1.1 is 1
    ("(a [b] c)", "a b c", [("a", UP), ("c", UP)]),  # b is back to 1
    ("((red) (blue))", "red blue", [("red", UP**2), ("blue", UP**2)]),
    ("(red) (blue)", "red blue", [("red", UP), ("blue", UP)]),
    ("(red)(blue)", "redblue", [("redblue", UP)]),  # one run of equal weight
    ("( red )", " red ", [("red", UP)]),  # spans are trimmed, the text is not
    ("(red, blue)", "red, blue", [("red, blue", UP)]),
    ("(café:2)", "café", [("café", 2.0)]),
    # backslash escapes: literal characters, no weighting
    (r"\(red\)", "(red)", []),
    (r"\[red\]", "[red]", []),
    (r"a\\b", "a\\b", []),
    (r"time\: 5", "time: 5", []),
    (r"(a\:b)", "a:b", [("a:b", UP)]),
    (r"(\(red\):2)", "(red)", [("(red)", 2.0)]),
    (r"C\+\+", "C++", []),
    (r"red\-", "red-", []),
    # compel suffixes on words
    ("red+ circle", "red circle", [("red", UP)]),
    ("red++", "red", [("red", UP**2)]),
    ("red+++", "red", [("red", UP**3)]),
    ("red- circle", "red circle", [("red", DOWN_MINUS)]),
    ("red--", "red", [("red", DOWN_MINUS**2)]),
    ("red+, blue", "red, blue", [("red", UP)]),
    ("(red+ circle)", "red circle", [("red", UP * UP), ("circle", UP)]),
    ("[red-]", "red", [("red", DOWN_MINUS * DOWN_BRACKET)]),
    ("well-known-", "well-known", [("well-known", DOWN_MINUS)]),
    ("x-ray+", "x-ray", [("x-ray", UP)]),
    # compel group weights
    ("(red circle)1.3", "red circle", [("red circle", 1.3)]),
    ("(red circle)0.5 sky", "red circle sky", [("red circle", 0.5)]),
    ("(red).5", "red", [("red", 0.5)]),
    ("(red)2.", "red", [("red", 2.0)]),
    ("(red circle)++", "red circle", [("red circle", UP**2)]),
    ("(red circle)-", "red circle", [("red circle", DOWN_MINUS)]),
    ("(red circle)--, sky", "red circle, sky", [("red circle", DOWN_MINUS**2)]),
    ("((red)1.5 circle)", "red circle", [("red", 1.5 * UP), ("circle", UP)]),
    ("((red:2))1.5", "red", [("red", 3.0)]),
    # ambiguity rules: signs and numbers that are NOT weights
    ("x-ray", "x-ray", []),
    ("a+b", "a+b", []),
    ("red+-", "red+-", []),  # mixed signs
    ("a - b", "a - b", []),
    ("-5 degrees", "-5 degrees", []),
    ("red +", "red +", []),  # the sign does not touch the word
    ("[red]++", "red++", [("red", DOWN_BRACKET)]),  # suffixes attach to words and ( ) only
    ("(red) 1.3", "red 1.3", [("red", UP)]),  # number not immediately after ')'
    ("(red)2nd", "red2nd", [("red", UP)]),  # number not ending at a boundary
    ("(red)2-3", "red2-3", [("red", UP)]),
    # colons outside ( ) are text
    ("style: photo", "style: photo", []),
    (":1.5", ":1.5", []),
    ("a:1.5 b", "a:1.5 b", []),
    # whitespace is kept as written
    ("a  (red:2)\tcircle\nsky", "a  red\tcircle\nsky", [("red", 2.0)]),
]


@pytest.mark.parametrize(
    ("source", "clean", "expected"), VALID_CASES, ids=[repr(case[0]) for case in VALID_CASES]
)
def test_valid_prompts(source, clean, expected):
    result = parse_prompt(source)
    assert result.text == clean
    assert_spans(result, expected)
    for span in result.spans:
        assert result.text[span.start : span.end] == span.text


# (prompt, column of the error, fragment of the message)
ERROR_CASES = [
    ("(red", 0, "never closed"),
    ("a (red circle", 2, "never closed"),
    ("((red)", 0, "never closed"),
    ("(red:2", 0, "never closed"),
    ("red)", 3, "no '(' is open"),
    ("(red))", 5, "no '(' is open"),
    ("[red", 0, "never closed"),
    ("red]", 3, "no '[' is open"),
    ("(red]", 4, "expected ')'"),
    ("[red)", 4, "expected ']'"),
    ("(red:abc)", 5, "expected a number"),
    ("(red: abc )", 6, "expected a number"),
    ("(style: photo)", 8, "expected a number"),
    ("(red:1e3)", 5, "expected a number"),
    ("(red:- 1)", 5, "expected a number"),
    ("(red:)", 5, "expected a weight"),
    ("(red:inf)", 5, "finite"),
    ("(red:-inf)", 5, "finite"),
    ("(red:nan)", 5, "finite"),
    ("(red:" + "9" * 400 + ")", 5, "finite"),
    ("(red)" + "9" * 400, 5, "finite"),
    ("((red:1" + "0" * 200 + "):1" + "0" * 200 + ")", 0, "float"),
    ("()", 0, "empty group"),
    ("a ( ) b", 2, "empty group"),
    ("(:2)", 0, "empty group"),
    ("()1.5", 0, "empty group"),
    ("[]", 0, "empty group"),
    ("[red:2]", 4, "[...] group cannot carry a weight"),
    ("([red:2])", 5, "[...] group cannot carry a weight"),
    ("[from:to:0.5]", 5, "not supported"),
    ("red\\", 3, "lone backslash"),
    ("\\", 0, "lone backslash"),
    (r"a\nb", 1, "unknown escape"),
    ("(red:2)1.5", 7, "already has a weight"),
    ("(red:2)++", 7, "already has a weight"),
    ("(" * 101 + "red" + ")" * 101, 100, "nest deeper"),
    ("line one\n(red:x)", 14, "expected a number"),
]


@pytest.mark.parametrize(
    ("source", "column", "fragment"), ERROR_CASES, ids=[repr(case[0][:30]) for case in ERROR_CASES]
)
def test_errors(source, column, fragment):
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt(source)
    error = caught.value
    message = str(error)
    assert error.column == column
    assert isinstance(error, ValueError)
    assert fragment in message
    assert f"column {column}" in message
    # the last two lines: the offending line, then a caret under the column
    *_, shown, caret = message.split("\n")
    line_start = source.rfind("\n", 0, column) + 1
    assert caret.strip() == "^"
    assert caret.index("^") - 2 == column - line_start
    assert shown[2:] == source[line_start:].split("\n")[0].replace("\t", " ")


def test_nesting_at_the_limit_is_fine():
    result = parse_prompt("(" * 100 + "red" + ")" * 100)
    assert result.spans[0].weight == pytest.approx(UP**100)


# -- weights(): words and the n-th occurrence convention ----------------------

WEIGHTS_CASES = [
    ("a red circle", {}),
    ("(red circle:1.3)", {"red": 1.3, "circle": 1.3}),
    ("((red:1.5) circle) sky", {"red": 1.5 * UP, "circle": UP}),
    ("(red, blue)", {"red": UP, "blue": UP}),
    ("red and (red:2)", {"red#2": 2.0}),
    ("(red:2) and red", {"red": 2.0}),
    ("(red) (red:2) [red]", {"red": UP, "red#2": 2.0, "red#3": DOWN_BRACKET}),
    ("Red (red:2)", {"red#2": 2.0}),  # occurrences ignore case
    ("x-ray x-ray+", {"x-ray#2": UP}),
    ("(red)dish", {}),  # only part of a word is weighted: the span says so, weights() skips it
    (r"(\(:2) cat", {}),  # a span without words
]


@pytest.mark.parametrize(("source", "expected"), WEIGHTS_CASES, ids=[repr(case[0]) for case in WEIGHTS_CASES])
def test_weights(source, expected):
    weights = parse_prompt(source).weights()
    assert weights.keys() == expected.keys()
    for word, weight in expected.items():
        assert weights[word] == pytest.approx(weight)


def test_spans_are_records_with_positions():
    result = parse_prompt("a (red:2) [circle] of x-ray++")
    assert result == WeightedPrompt(
        "a red circle of x-ray",
        (
            WeightedSpan("red", 2, 5, 2.0),
            WeightedSpan("circle", 6, 12, DOWN_BRACKET),
            WeightedSpan("x-ray", 16, 21, UP**2),
        ),
    )


# -- properties ---------------------------------------------------------------

SYNTAX_HEAVY = st.text(alphabet="()[]:+-\\. 0123456789abcxyz", max_size=40)
ANY_TEXT = st.text(max_size=40)


@settings(max_examples=400, deadline=None)
@given(st.one_of(SYNTAX_HEAVY, ANY_TEXT))
def test_fuzz_parses_or_raises_syntax_error(source):
    try:
        result = parse_prompt(source)
    except PromptSyntaxError as error:
        assert 0 <= error.column <= len(source)
        assert "^" in str(error)
        return
    previous_end = 0
    for span in result.spans:
        assert previous_end <= span.start < span.end <= len(result.text)
        assert result.text[span.start : span.end] == span.text
        assert span.text == span.text.strip()
        assert math.isfinite(span.weight) and span.weight != 1.0
        previous_end = span.end
    assert len(result.text) <= len(source)
    assert all(math.isfinite(weight) for weight in result.weights().values())


PLAIN_WORD = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=8)
SEPARATOR = st.sampled_from([" ", "  ", ", ", "\n", "\t", ". "])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PLAIN_WORD, SEPARATOR), max_size=10))
def test_plain_words_round_trip(words):
    source = "".join(word + separator for word, separator in words)
    result = parse_prompt(source)
    assert result.text == source
    assert result.spans == ()
    assert result.weights() == {}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(PLAIN_WORD, min_size=1, max_size=3),
            st.decimals(min_value=-5, max_value=5, places=2, allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_explicit_group_weights_match(groups):
    """``(w1 w2:x) (w3:y) ...`` gives each group its own weight and keeps the words."""
    source = " ".join(f"({' '.join(words)}:{float(weight)})" for words, weight in groups)
    result = parse_prompt(source)
    assert result.text == " ".join(" ".join(words) for words, _ in groups)
    expected = [(" ".join(words), float(weight)) for words, weight in groups if float(weight) != 1.0]
    assert_spans(result, expected)

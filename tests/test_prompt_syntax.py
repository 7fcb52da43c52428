"""The A1111 dialect of xattn.prompts: A1111's own docstring examples, hand cases, and a grammar.

References are independent of the parser: A1111's documented outputs as data,
weights derived by hand from the rules, and ``a1111_grammar`` (a hypothesis
grammar with its own evaluator over the generated structure).
"""

from __future__ import annotations

import string

import pytest
from a1111_grammar import BREAK_ITEM, a1111_structure, expected_items, render
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from xattn.prompt_syntax import PromptSyntaxError, WeightedPrompt, WeightedSpan, parse_prompt
from xattn.prompts import PromptWarning, ScheduledPromptError, UnsupportedSyntaxError, parse_attention

UP = 1.1
DOWN = 1 / 1.1

# The examples in the docstring of A1111's parse_prompt_attention (modules/prompt_parser.py): input, output.
A1111_DOCSTRING = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize(("source", "fragments"), A1111_DOCSTRING, ids=[case[0] for case in A1111_DOCSTRING])
def test_a1111_docstring_examples_exactly(source, fragments):
    """Same pieces, same float weights (1.5730000000000004, not 1.573)."""
    assert [(f.text, f.weight) for f in parse_attention(source)] == fragments


# Prompts people write that A1111 reads; fragments derived by hand from the rules.
HAND_CASES = [
    ("smile :)", [("smile :)", 1.0)]),  # a stray ) is text
    ("\\m/", [("m/", 1.0)]),  # an unknown escape drops the backslash
    ("a\\", [("a", 1.0)]),
    ("(artist:nixeu:1.2)", [("artist:nixeu", 1.2)]),  # only the last colon is the weight
    ("(a:1e1)", [("a:1e1", UP)]),  # not A1111's number pattern: text, and the group is x1.1
    ("(style: photo)", [("style: photo", UP)]),
    ("()", [("", 1.0)]),
    ("(a:0.5", [("a:0.5", UP)]),  # no ) after the number: the colon is text, the ( never closes
    ("( red : 1.5 )", [(" red ", 1.5)]),
    ("(red:-1)", [("red", -1.0)]),
    ("[unclosed", [("unclosed", DOWN)]),
    ("a]b", [("a]b", 1.0)]),
    ("(a[b)c]", [("a", UP), ("b", UP * DOWN), ("c", DOWN)]),  # round and square brackets match separately
    ("([a", [("a", 1.0 * UP * DOWN)]),  # open ( applied before open [
    ("[(a", [("a", 1.0 * UP * DOWN)]),
    ("([a])", [("a", 1.0 * DOWN * UP)]),
    ("(a)dish", [("a", UP), ("dish", 1.0)]),
    (":1.5) a", [(":1.5) a", 1.0)]),  # a weight with no ( open is text
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # not a whole word
    ("(a BREAK b)", [("a", UP), ("BREAK", -UP), ("b", UP)]),  # A1111 multiplies the mark too
]


@pytest.mark.parametrize(("source", "fragments"), HAND_CASES, ids=[case[0] for case in HAND_CASES])
def test_a1111_hand_cases(source, fragments):
    assert [(f.text, f.weight) for f in parse_attention(source)] == fragments


def test_a_break_splits_chunks_and_leaves_no_text():
    prompt = parse_prompt("a red circle BREAK a blue square")
    assert prompt.text == "a red circlea blue square"
    assert prompt.breaks == (len("a red circle"),)
    assert [f.is_break for f in prompt.fragments] == [False, True, False]
    inside = parse_prompt("(a BREAK b)")
    assert inside.breaks == () and inside.text == "aBREAKb"  # A1111: the word BREAK at weight -1.1


def test_weight_a1111_cannot_read_is_an_error():
    with pytest.raises(PromptSyntaxError, match="not a number"):
        parse_prompt("(red:1.2.3)")
    assert parse_prompt("red:1.2.3)").text == "red:1.2.3)"  # no ( open: text, as in A1111


@settings(max_examples=300, deadline=None)
@given(a1111_structure())
def test_grammar_generated_prompts_weigh_every_character_as_the_rules_say(structure):
    prompt = render(structure)
    got = []
    for fragment in parse_attention(prompt):
        got += [(BREAK_ITEM, None)] if fragment.is_break else [(char, fragment.weight) for char in fragment.text]
    assert got == expected_items(structure)


@settings(max_examples=150, deadline=None)
@given(a1111_structure())
def test_clean_text_and_spans_follow_the_fragments(structure):
    try:
        result = parse_prompt(render(structure))
    except UnsupportedSyntaxError:  # e.g. "[:1e1]" is prompt editing for A1111
        assume(False)
    assert result.text == "".join(f.text for f in result.fragments)
    for span in result.spans:
        assert result.text[span.start : span.end] == span.text == span.text.strip()
        assert span.weight != 1.0


# -- strict: today's errors, for users who want them ---------------------------

STRICT_ERRORS = [
    ("(red", 0, "never closed"),
    ("[red", 0, "never closed"),
    ("red)", 3, "no '(' is open"),
    ("red]", 3, "no '[' is open"),
    ("smile :)", 7, "no '(' is open"),
    ("a:1.5)", 5, "no '(' is open"),
    ("\\m/", 0, "drops a backslash"),
    ("()", 0, "empty group"),
    ("(style: photo)", 6, "colon inside a group"),
    ("[red: photo]", 4, "colon inside a group"),
    ("(a BREAK b)", 3, "BREAK inside brackets"),
]


@pytest.mark.parametrize(("source", "column", "fragment"), STRICT_ERRORS, ids=[c[0] for c in STRICT_ERRORS])
def test_strict_raises_where_a1111_repairs(source, column, fragment):
    parse_prompt(source)  # A1111 reads it
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt(source, strict=True)
    error = caught.value
    assert error.column == column and fragment in str(error) and f"column {column}" in str(error)
    *_, shown, caret = str(error).split("\n")
    assert caret.index("^") - 2 == column and shown[2:] == source


@pytest.mark.parametrize("source", ["a (red:1.5) circle", "((a)) [b] (c:0.5), d BREAK e", r"\(x\)"])
def test_strict_accepts_well_formed_prompts(source):
    assert parse_prompt(source, strict=True) == parse_prompt(source)


# -- what A1111 reads before attention: refused or stripped, never sent to CLIP --------

# The examples in the docstring of A1111's get_learned_conditioning_prompt_schedules that schedule something.
A1111_SCHEDULES = ["a [b:3]", "a [b: 3]", "a [[[b]]:2]", "[(a:2):3]", "a [b : c : 1] d", "a[b:[c:d:2]:1]e",
                   "a [b:.5] c", "a [{b|d{:.5] c", "((a][:b:c [d:3]"]


@pytest.mark.parametrize("source", A1111_SCHEDULES + ["[a|(b:1.1)]", "[cat|dog] in a field"])
def test_prompt_editing_and_alternation_are_schedules_not_one_prompt(source):
    # run by xattn.prompts.PromptSchedule (tests/test_prompt_schedule.py)
    with pytest.raises(ScheduledPromptError, match="step schedule"):
        parse_prompt(source)


def test_composition_is_not_one_prompt_and_names_its_runner():
    # run by xattn.prompts.ComposedPrompt (tests/test_prompt_compose.py)
    with pytest.raises(UnsupportedSyntaxError, match="AND .composable diffusion. is not one weighted prompt.*ComposedPrompt"):
        parse_prompt("a cat AND a dog:0.5")


@pytest.mark.parametrize("source", ["test", "a [unbalanced", "salt and pepper", "ANDROID", r"\[a:b:3\]", "[a:b]"])
def test_lookalikes_are_plain_prompts(source):
    parse_prompt(source)


def test_extra_network_tags_are_stripped_with_a_warning():
    with pytest.warns(PromptWarning, match="<lora:film:0.8>"):
        result = parse_prompt("a (red:1.2) circle <lora:film:0.8>")
    assert result.text == "a red circle " and result.weights() == {"red": 1.2}


def test_unknown_syntax_name():
    with pytest.raises(PromptSyntaxError, match="unknown prompt syntax 'webui'"):
        parse_prompt("a cat", syntax="webui")


# -- the record: clean text, spans, words ----------------------------------------


def test_spans_are_records_with_positions():
    result = parse_prompt("a (red:2) [circle] of x-ray")
    assert result.text == "a red circle of x-ray"
    assert result.spans == (WeightedSpan("red", 2, 5, 2.0), WeightedSpan("circle", 6, 12, DOWN))
    assert isinstance(result, WeightedPrompt)


WEIGHTS_CASES = [
    ("a red circle", {}),
    ("(red circle:1.3)", {"red": 1.3, "circle": 1.3}),
    ("((red:1.5) circle) sky", {"red": 1.5 * UP, "circle": UP}),
    ("red and (red:2)", {"red#2": 2.0}),
    ("(red) (red:2) [red]", {"red": UP, "red#2": 2.0, "red#3": DOWN}),
    ("Red (red:2)", {"red#2": 2.0}),
    ("(red)dish", {}),  # only part of a word: the span says so, weights() skips it
    ("([a])", {}),  # x1.1 /1.1 is 1 within 1e-9
]


@pytest.mark.parametrize(("source", "expected"), WEIGHTS_CASES, ids=[case[0] for case in WEIGHTS_CASES])
def test_weights(source, expected):
    weights = parse_prompt(source).weights()
    assert weights.keys() == expected.keys()
    for word, weight in expected.items():
        assert weights[word] == pytest.approx(weight)


PLAIN_WORD = st.text(alphabet=string.ascii_lowercase + string.digits + "_", min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(PLAIN_WORD, st.sampled_from([" ", ", ", "\n", ". "])), max_size=10))
def test_plain_words_round_trip(words):
    source = "".join(word + separator for word, separator in words)
    result = parse_prompt(source)
    assert result.text == source and result.spans == ()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(PLAIN_WORD, min_size=1, max_size=3),
                          st.decimals(min_value=-5, max_value=5, places=2)), min_size=1, max_size=5))
def test_explicit_group_weights(groups):
    source = " ".join(f"({' '.join(words)}:{float(weight)})" for words, weight in groups)
    result = parse_prompt(source)
    assert result.text == " ".join(" ".join(words) for words, _ in groups)
    assert [(s.text, s.weight) for s in result.spans] == [
        (" ".join(words), float(weight)) for words, weight in groups if float(weight) != 1.0]

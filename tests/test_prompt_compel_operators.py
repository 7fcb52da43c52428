"""compel's operators in the compel dialect: .blend(), .and() / .add(), .swap(), with compel 2.5.1 as the oracle.

Every expected value comes from compel itself (the ``test`` extra): its parser for
the structure, ``Compel(...)(prompt)`` for the embeddings (≤ 1e-6).
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xattn.prompts import PromptSyntaxError, UnsupportedSyntaxError, encode_prompt, parse_prompt

compel = pytest.importorskip("compel")
compel_parser = pytest.importorskip("compel.prompt_parser")

OPERATOR_PROMPTS = [
    '("a red circle", "a blue square").blend(0.7, 0.3)',
    '("a red++ circle", "a blue-- square").blend(1, 1, no_normalize)',
    '("a red circle", (blue square), green).blend()',
    '("a (red circle)0.5", "a blue square").blend(0.25, 0.75)',
    '("a red circle", "a blue square").and()',
    '("a red circle", "a (blue)0.5 square").and(1, 0.5)',
    '("a red circle", "in the corner").add(0.8, 1.2)',
    '("a red circle.swap(square)", "a blue square").and(1, 0.6)',
    "a red circle.swap(square) and a blue square",
    "a (red circle).swap(blue square, t_start=0.1, s_end=0.3) and a green-- triangle",
    'a "red circle".swap(green triangle, shape_freedom=0.5)',
    "a ((red circle).swap(square))0.7 and (a blue square)0.6",
    "a red circle.swap() and a blue square",
]


def _compel(pipe, truncate=True):
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.bias += 0.5  # not needed by the formula; keeps values away from 0
    return compel.Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=truncate)


@pytest.mark.parametrize("prompt", OPERATOR_PROMPTS)
def test_operator_embeddings_equal_compels(sd1_pipe, prompt):
    oracle = _compel(sd1_pipe)
    with torch.no_grad():
        expected = oracle(prompt)
    got = encode_prompt(sd1_pipe, prompt, syntax="compel", max_chunks=1).prompt_embeds
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6
    untruncated = encode_prompt(sd1_pipe, prompt, syntax="compel").prompt_embeds  # short: the same
    assert (untruncated - expected).abs().max().item() <= 1e-6


def test_and_concatenates_along_the_sequence_and_blend_mixes(sd1_pipe):
    both = encode_prompt(sd1_pipe, '("a red circle", "a blue square").and()', syntax="compel").prompt_embeds
    first = encode_prompt(sd1_pipe, "a red circle", syntax="compel").prompt_embeds
    second = encode_prompt(sd1_pipe, "a blue square", syntax="compel").prompt_embeds
    assert both.shape[1] == 154 and torch.equal(both[:, :77], first) and torch.equal(both[:, 77:], second)
    blend = encode_prompt(sd1_pipe, '("a red circle", "a blue square").blend(3, 1)', syntax="compel").prompt_embeds
    assert (blend - (0.75 * first + 0.25 * second)).abs().max().item() <= 1e-6


# -- structure: compel's own parser on generated operator prompts ----------------------

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=5)
SIGNS = st.sampled_from(["", "+", "++", "-", "--"])
WEIGHT = st.sampled_from(["1", "0.5", "0.25", "1.5", "2", ".5", "0"])


@st.composite
def words(draw, low=1, high=3, signs=True):
    return " ".join(draw(WORD) + (draw(SIGNS) if signs else "") for _ in range(draw(st.integers(low, high))))


@st.composite
def swap(draw, in_quotes=False):
    target = draw(st.sampled_from(["word", "group"] + ([] if in_quotes else ["quoted"])))
    original = draw(WORD) if target == "word" else draw(words(signs=False))
    written = {"word": original, "group": f"({original})", "quoted": f'"{original}"'}[target]
    options = draw(st.sampled_from(["", ", t_start=0.1", ", s_start=0.1, s_end=0.5", ", shape_freedom=0.5"]))
    return f"{written}.swap({draw(words(0, 3))}{options})"


@st.composite
def plain_with_swaps(draw, in_quotes=False):
    parts = [draw(st.one_of(words(), swap(in_quotes), words().map(lambda w: f"({w})" + "1.3")))
             for _ in range(draw(st.integers(1, 3)))]
    return " ".join(parts)


@st.composite
def operator_prompt(draw):
    kind = draw(st.sampled_from(["blend", "and", "add", "swap"]))
    if kind == "swap":
        return draw(plain_with_swaps())
    count = draw(st.integers(1, 3))
    targets = []
    for _ in range(count):
        shape = draw(st.sampled_from(["quoted", "group", "word"]))
        if shape == "word":
            targets.append(draw(WORD))
        elif shape == "group":
            targets.append(f"({draw(words(signs=False))})")
        else:
            targets.append('"' + draw(plain_with_swaps(in_quotes=True) if kind != "blend" else words()) + '"')
    weights = [draw(WEIGHT) for _ in range(count)] if draw(st.booleans()) else []
    if kind == "blend" and weights and draw(st.booleans()):
        weights.append("no_normalize")
    if kind == "blend" and weights and all(float(w) == 0 for w in weights if w != "no_normalize"):
        weights[0] = "1"
    return f"({', '.join(targets)}).{kind}({', '.join(weights)})"


def _words(fragments) -> list[tuple[str, float]]:
    return [(word, weight) for text, weight in fragments for word in re.findall(r"[a-z]+", text)]


def _oracle_side(flat, side: str) -> list[tuple[str, float]]:
    pairs = []
    for child in flat.children:
        if isinstance(child, compel_parser.CrossAttentionControlSubstitute):
            pairs += [(f.text, f.weight) for f in (child.original if side == "source" else child.edited)]
        else:
            pairs.append((child.text, child.weight))
    return _words(pairs)


def _mine(record, side: str = "source") -> list[tuple[str, float]]:
    if side == "target" and record.operator is not None and record.operator.kind == "swap":
        record = record.operator.parts[1]
    return _words([(f.text, f.weight) for f in record.fragments if not f.is_break])


@settings(max_examples=200, deadline=None)
@given(operator_prompt())
def test_operator_structure_equals_compels_parser(prompt):
    oracle = compel_parser.PromptParser().parse_conjunction(prompt)
    mine = parse_prompt(prompt, syntax="compel")
    parts = oracle.prompts
    if len(parts) == 1 and isinstance(parts[0], compel_parser.Blend):
        blend = parts[0]
        assert mine.operator.kind == "blend" and mine.operator.normalize == blend.normalize_weights
        assert list(mine.operator.weights) == pytest.approx(blend.weights)
        assert [_mine(p) for p in mine.operator.parts] == [_oracle_side(p, "source") for p in blend.prompts]
        return
    if len(parts) > 1 or (mine.operator is not None and mine.operator.kind == "and"):
        assert mine.operator.kind == "and" and list(mine.operator.weights) == pytest.approx(oracle.weights)
        mine_parts = list(mine.operator.parts)
    else:
        mine_parts = [mine]
    assert len(mine_parts) == len(parts)
    for record, flat in zip(mine_parts, parts):
        for side in ("source", "target"):
            got, expected = _mine(record, side), _oracle_side(flat, side)
            assert [w for w, _ in got] == [w for w, _ in expected]
            assert [x for _, x in got] == pytest.approx([x for _, x in expected], rel=1e-12, abs=0)
        swaps = [c for c in flat.children if isinstance(c, compel_parser.CrossAttentionControlSubstitute)]
        if swaps:
            assert [dict(s.options) for s in record.operator.swaps] == [pytest.approx(s.options) for s in swaps]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=operator_prompt())
def test_generated_operator_embeddings_equal_compels(sd1_pipe, prompt):
    oracle = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder,
                           truncate_long_prompts=False)
    with torch.no_grad():
        expected = oracle(prompt)
    got = encode_prompt(sd1_pipe, prompt, syntax="compel").prompt_embeds
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("prompt", [r"a\,b cat", r"x\- y", r"c\+ z", r"a\.b", r"a\=b", r"(c\+ d)1.2", r"a \(b\)",
                                    r"x\-- y", r'say \"hi\"'])
def test_escapes_reach_the_encoder_as_compel_sends_them(sd1_pipe, prompt):
    oracle = compel_parser.PromptParser().parse_conjunction(prompt).prompts[0].children
    mine = [f for f in parse_prompt(prompt, syntax="compel").fragments]
    assert [(f.text.strip(), f.weight) for f in mine] == [(f.text, f.weight) for f in oracle]
    with torch.no_grad():
        expected = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder)(prompt)
    assert (encode_prompt(sd1_pipe, prompt, syntax="compel").prompt_embeds - expected).abs().max().item() <= 1e-6


# -- .swap() as an edit -----------------------------------------------------------------

def test_swap_is_data_and_becomes_an_edit_compel_would_make():
    prompt = "a (red circle).swap(blue++ square, t_start=0.1, s_end=0.3) and a green-- triangle"
    operator = parse_prompt(prompt, syntax="compel").operator
    swap_node = next(c for c in compel_parser.PromptParser().parse_conjunction(prompt).prompts[0].children
                     if isinstance(c, compel_parser.CrossAttentionControlSubstitute))
    assert operator.kind == "swap"
    assert (operator.swaps[0].original, operator.swaps[0].edited) == ("red circle", "blue square")
    assert dict(operator.swaps[0].options) == pytest.approx(swap_node.options)
    edit = operator.as_edit()
    assert (edit.cross_steps, edit.self_steps) == ("0.1:1.0", "0.0:0.3")
    oracle = compel_parser.PromptParser().parse_conjunction(prompt).prompts[0]
    for text, side in ((edit.source, "source"), (edit.target, "target")):
        got, expected = _mine(parse_prompt(text, syntax="compel")), _oracle_side(oracle, side)
        assert [w for w, _ in got] == [w for w, _ in expected]
        assert [x for _, x in got] == pytest.approx([x for _, x in expected], rel=1e-12)


def test_a_swap_runs_as_an_xattn_edit(sd1_pipe):
    from xattn.edit import edit

    swap_edit = parse_prompt("a red circle.swap(square) and a blue square", syntax="compel").operator.as_edit()
    result = edit(sd1_pipe, swap_edit.source, swap_edit.target, seed=0, steps=2, size=32, output_type="latent",
                  reprompt=False, **swap_edit.options())
    assert result is not None


# -- refusals, by name ------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "error", "says"), [
    ("withLora(film, 0.8) a cat", UnsupportedSyntaxError, r"withLora\(\) is not supported"),
    ("a cat useLora(film)", UnsupportedSyntaxError, r"useLora\(\) is not supported"),
    ('("a cat", "a dog").and() and more', PromptSyntaxError, r"\.and\(\) only after a target"),
    ('a ("a cat", "a dog").blend(1, 1)', PromptSyntaxError, r"\.blend\(\) only after a target"),
    ('("a cat", "a dog").blend(0.7)', PromptSyntaxError, "2 prompts and 1 weights"),
    ('("a cat", "a dog").blend(s_start=1, 2)', PromptSyntaxError, "takes numbers"),
    ('("a cat.swap(dog)", "a dog").blend(1, 1)', UnsupportedSyntaxError, "inside a .blend"),
    ("a (cat)0.5.swap(dog)", PromptSyntaxError, "no .swap\\(\\) after a weight"),
    ("a cat.swap(dog, colour=1)", PromptSyntaxError, "options are"),
    ("a cat.swap(dog.swap(fox))", UnsupportedSyntaxError, "inside a .swap"),
    ("a cat.swap(dog", PromptSyntaxError, "never closed"),
])
def test_what_compel_would_turn_into_text_or_reject_raises_a_named_error(prompt, error, says):
    with pytest.raises(error, match=says):
        parse_prompt(prompt, syntax="compel")


def test_attention_level_encoding_refuses_whole_prompt_weights(sd1_pipe):
    with pytest.raises(UnsupportedSyntaxError, match="no attention-level form"):
        encode_prompt(sd1_pipe, '("a cat", "a dog").blend(1, 1)', syntax="compel", emphasis=False)
    with pytest.raises(UnsupportedSyntaxError, match="no attention-level form"):
        encode_prompt(sd1_pipe, '("a cat", "a dog").and(1, 0.5)', syntax="compel", emphasis=False)
    plain = encode_prompt(sd1_pipe, '("a cat", "a dog").and()', syntax="compel", emphasis=False)
    assert plain.prompt_embeds.shape[1] == 154 and plain.token_map.indices("dog") == [79]

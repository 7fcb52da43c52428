"""Token alignment of source and target prompts: hand-written tables of expected mappings.

Every expected mapping below was worked out by hand from CLIP's tokenization
(checked at the top of the table), not read off the implementation.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import tiny_models
from xattn import TokenMap
from xattn.edit import EditError, align_tokens, refine_mapper, replace_mapper, stretch
from xattn.edit.align import build_mapper, choose_mode


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_models.tokenizer()


def test_the_table_rests_on_these_tokenizations(tokenizer):
    assert tokenizer.tokenize("skyscraper") == ["sky", "scra", "per</w>"]
    assert tokenizer.tokenize("birdhouse") == ["bird", "house</w>"]
    for word in ("a", "red", "green", "circle", "big", "near", "small", "blue", "square", "and"):
        assert len(tokenizer.tokenize(word)) == 1, word


# (source, target, {target slot: {source slot: weight}}) for the word slots; the rest is checked separately.
REPLACE_TABLE = [
    # same words but one: identity everywhere
    ("a red circle and a blue square", "a green circle and a blue square",
     {t: {t: 1} for t in range(8)}),
    # one piece -> three pieces: the source piece's attention is shared in thirds
    ("a red circle", "a red skyscraper",
     {0: {0: 1}, 1: {1: 1}, 2: {2: 1}, 3: {3: Fraction(1, 3)}, 4: {3: Fraction(1, 3)}, 5: {3: Fraction(1, 3)},
      6: {4: 1}}),
    # three pieces -> one: the target piece gathers all three
    ("a skyscraper", "a circle", {0: {0: 1}, 1: {1: 1}, 2: {2: 1, 3: 1, 4: 1}, 3: {5: 1}}),
    # two pieces -> three: overlaps of [0, 1/2), [1/2, 1) with thirds, times 2
    ("a birdhouse", "a skyscraper",
     {2: {2: Fraction(2, 3)}, 3: {2: Fraction(1, 3), 3: Fraction(1, 3)}, 4: {3: Fraction(2, 3)}, 5: {4: 1}}),
]

# (source, target, {target slot: source slot or None (keeps its own)})
REFINE_TABLE = [
    ("a red circle", "a big red circle", {0: 0, 1: 1, 2: None, 3: 2, 4: 3, 5: 4}),
    ("a red circle", "a green circle", {0: 0, 1: 1, 2: None, 3: 3, 4: 4}),
    ("a circle", "a circle near a birdhouse", {0: 0, 1: 1, 2: 2, 3: None, 4: None, 5: None, 6: None, 7: 3}),
    ("a red circle and a blue square", "a red circle and a small blue square",
     {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: None, 7: 6, 8: 7, 9: 8}),
    ("a big red circle", "a red circle", {0: 0, 1: 1, 2: 3, 3: 4, 4: 5}),
]


@pytest.mark.parametrize("source, target, expected", REPLACE_TABLE)
def test_replace_mapper_table(tokenizer, source, target, expected):
    mapper = replace_mapper(TokenMap(tokenizer, source), TokenMap(tokenizer, target))
    for t, sources in expected.items():
        column = mapper.matrix[:, t]
        got = {s: column[s].item() for s in torch.nonzero(column).flatten().tolist()}
        assert got.keys() == sources.keys(), (t, got)
        for s, weight in sources.items():
            assert got[s] == pytest.approx(float(weight), abs=1e-12), (t, s)
    assert torch.all(mapper.alpha == 1)


@pytest.mark.parametrize("source, target, expected", REPLACE_TABLE)
def test_replace_moves_attention_without_creating_or_losing_it(tokenizer, source, target, expected):
    mapper = replace_mapper(TokenMap(tokenizer, source), TokenMap(tokenizer, target))
    rows = mapper.matrix.sum(dim=1)  # what each source slot hands on
    assert torch.allclose(rows, torch.ones_like(rows))
    assert torch.all(mapper.matrix >= 0)


@pytest.mark.parametrize("source, target, expected", REFINE_TABLE)
def test_refine_mapper_table(tokenizer, source, target, expected):
    mapper = refine_mapper(TokenMap(tokenizer, source), TokenMap(tokenizer, target))
    for t, s in expected.items():
        assert mapper.sources_of(t) == ([] if s is None else [s]), t
        assert mapper.alpha[t].item() == (0.0 if s is None else 1.0)
        if s is not None:
            assert mapper.matrix[s, t].item() == 1.0


def test_end_and_padding_follow_the_end_token(tokenizer):
    source, target = TokenMap(tokenizer, "a red circle"), TokenMap(tokenizer, "a red skyscraper")
    mapper = replace_mapper(source, target)
    assert mapper.sources_of(target.end_slot) == [source.end_slot]
    # 72 source pads onto 70 target pads: every target pad is fed, nothing feeds a word slot from the padding
    pads = mapper.matrix[source.end_slot + 1:, :]
    assert torch.all(pads[:, : target.end_slot + 1] == 0)
    assert torch.all(mapper.matrix[:, target.end_slot + 1:].sum(dim=0) > 0)


def test_stretch_is_identity_for_equal_counts_and_shares_by_overlap():
    assert torch.equal(stretch(4, 4), torch.eye(4, dtype=torch.float64))
    expected = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]], dtype=torch.float64) * torch.tensor(
        [[2 / 3], [2 / 3]], dtype=torch.float64)  # 2 -> 3: [2/3, 1/3, 0], [0, 1/3, 2/3]
    assert torch.allclose(stretch(2, 3), expected)
    with pytest.raises(EditError, match="at least one slot"):
        stretch(0, 3)


ALIGN_TABLE = [
    (list("abc"), list("abc"), [(0, 0), (1, 1), (2, 2)]),
    (list("ac"), list("abc"), [(0, 0), (None, 1), (1, 2)]),
    (list("abc"), list("ac"), [(0, 0), (1, None), (2, 1)]),
    (list("axc"), list("ayc"), [(0, 0), (1, None), (None, 1), (2, 2)]),  # a change is not a match
    ([], list("ab"), [(None, 0), (None, 1)]),
]


@pytest.mark.parametrize("a, b, expected", ALIGN_TABLE)
def test_align_tokens_table(a, b, expected):
    assert align_tokens(a, b) == expected


def test_word_swap_refuses_different_word_counts_and_names_refine(tokenizer):
    source, target = TokenMap(tokenizer, "a red circle"), TokenMap(tokenizer, "a big red circle")
    with pytest.raises(EditError, match=r"same number of words.*has 3.*has 4.*refine"):
        replace_mapper(source, target)
    assert choose_mode(source, target) == "refine"
    assert choose_mode(source, TokenMap(tokenizer, "a red square")) == "replace"
    with pytest.raises(EditError, match="replace, refine or auto"):
        build_mapper("swap", source, target)

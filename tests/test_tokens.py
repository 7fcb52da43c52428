"""TokenMap: words and phrases to slots of CLIP's 77-slot sequence."""

from __future__ import annotations

import pytest

import xattn
from tiny_models import tokenizer as load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _ids_at(tokenizer, prompt, slots):
    ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
    return [ids[s] for s in slots]


def _word_ids(tokenizer, word):
    return tokenizer(word, add_special_tokens=False).input_ids


def test_bos_offset(tokenizer):
    tm = xattn.TokenMap(tokenizer, "a photo of a cat")
    assert tm.indices("cat") == [5]
    assert _ids_at(tokenizer, "a photo of a cat", [5]) == _word_ids(tokenizer, "cat")


@pytest.mark.parametrize(
    "prompt, word",
    [
        ("a xylophonist playing", "xylophonist"),  # several BPE pieces
        ("the Tyrannosaurus and a cat", "tyrannosaurus"),  # case-insensitive, sub-words
        ("a cat, a dog.", ","),  # punctuation is a word of its own
        ("a cat, a dog.", "dog"),
        ("photo of 42 cats", "cats"),  # digits are single tokens
        ("it's a cat", "cat"),  # contractions
    ],
)
def test_word_slots_hold_that_words_tokens(tokenizer, prompt, word):
    """The slots TokenMap gives contain exactly the ids the tokenizer makes for the word."""
    slots = xattn.TokenMap(tokenizer, prompt).indices(word)
    assert len(slots) == len(_word_ids(tokenizer, word))
    assert _ids_at(tokenizer, prompt, slots) == _word_ids(tokenizer, word)
    assert slots == list(range(slots[0], slots[0] + len(slots)))


def test_nth_occurrence_and_all_occurrences(tokenizer):
    tm = xattn.TokenMap(tokenizer, "a cat and a cat")
    assert tm.indices("cat") == [2, 5]
    assert tm.indices("cat#1") == [2]
    assert tm.indices("cat#2") == [5]
    with pytest.raises(xattn.TokenError, match="occurs 2 time"):
        tm.indices("cat#3")


def test_phrase(tokenizer):
    tm = xattn.TokenMap(tokenizer, "a red circle and a blue square")
    assert tm.indices("red circle") == [2, 3]
    assert tm.indices("Blue Square") == [6, 7]
    with pytest.raises(xattn.TokenError):
        tm.indices("red square")


def test_special_tokens_by_name(tokenizer):
    prompt = "a red circle"
    tm = xattn.TokenMap(tokenizer, prompt)
    ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert tm.indices("<start>") == [0] and ids[0] == tokenizer.bos_token_id
    assert tm.indices("<end>") == [4] and ids[4] == tokenizer.eos_token_id
    assert tm.indices("<pad>") == list(range(5, 77))
    assert tm.indices(3) == [3]
    assert tm.word_at(3) == "circle" and tm.word_at(0) == "<start>" and tm.word_at(40) == "<pad>"


def test_unknown_word_lists_the_prompts_words(tokenizer):
    tm = xattn.TokenMap(tokenizer, "a red circle")
    with pytest.raises(xattn.TokenError) as info:
        tm.indices("square")
    message = str(info.value)
    assert "'square'" in message and "'red'" in message and "'circle'" in message


def test_index_out_of_range(tokenizer):
    with pytest.raises(xattn.TokenError, match="outside 0..76"):
        xattn.TokenMap(tokenizer, "a cat").indices(77)


def test_long_prompt_warns_and_names_cut_words(tokenizer):
    prompt = " ".join(["cat"] * 74 + ["zebra", "giraffe"])
    with pytest.warns(UserWarning, match="giraffe") as record:
        tm = xattn.TokenMap(tokenizer, prompt)
    assert "cat" not in str(record[0].message).split(":")[-1]
    assert tm.indices("zebra") == [75]
    with pytest.raises(xattn.TokenError, match="was cut"):
        tm.indices("giraffe")
    assert tm.indices("<end>") == [76]


def test_span_indices_follow_character_spans(tokenizer):
    prompt = "a red circle and a red square"
    tm = xattn.TokenMap(tokenizer, prompt)
    second_red = prompt.index("red", 5)
    assert tm.span_indices(second_red, second_red + 3) == tm.indices("red#2")
    assert tm.span_indices(2, 12) == tm.indices("red circle")
    with pytest.raises(xattn.TokenError, match="hold no token"):
        tm.span_indices(1, 2)  # a space

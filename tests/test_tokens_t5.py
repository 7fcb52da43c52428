"""TokenMap on a sentencepiece tokenizer (T5): no start token, ``▁`` word starts, ``</s>`` then padding.

The tokenizer is built offline (tests/tiny_t5.py); every expectation is read
from its own ``input_ids`` for the padded prompt.
"""

from __future__ import annotations

import pytest

import xattn
from tiny_models import tokenizer as clip_tokenizer
from tiny_t5 import MAX_LENGTH, t5_tokenizer
from xattn.tokens import is_sentencepiece, start_slots


@pytest.fixture(scope="module")
def tokenizer():
    return t5_tokenizer()


def padded_ids(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=MAX_LENGTH).input_ids


PROMPTS = ["a red circle", "a xylophonist playing", "a cat, a dog.", "Photo of 42 cats", "a Red circle on a red square"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_word_holds_its_pieces(tokenizer, prompt):
    ids = padded_ids(tokenizer, prompt)
    token_map = xattn.TokenMap(tokenizer, prompt)
    end = ids.index(tokenizer.eos_token_id)
    assert token_map.end_slot == end and token_map.max_length == MAX_LENGTH
    assert token_map.indices("<end>") == [end] and token_map.indices("<pad>") == list(range(end + 1, MAX_LENGTH))
    assert all(ids[slot] == tokenizer.pad_token_id for slot in token_map.indices("<pad>"))
    covered = sorted({slot for word in token_map.words for slot in word.slots})
    assert covered == list(range(end))  # no start token: the pieces fill slots 0 .. end - 1
    for word in token_map.words:
        assert tokenizer.decode([ids[s] for s in word.slots]).strip() == word.text or word.text.isdigit()


@pytest.mark.parametrize("prompt, word, pieces", [
    ("a red circle", "circle", 1),
    ("a red circle", "red circle", 2),
    ("a xylophonist playing", "xylophonist", 12),  # "▁", then one piece per letter
    ("a xylophonist playing", "playing", 8),
    ("a cat, a dog.", "dog", 1),
])
def test_word_slots_are_the_tokenizers_ids_for_the_word(tokenizer, prompt, word, pieces):
    slots = xattn.TokenMap(tokenizer, prompt).indices(word)
    ids = padded_ids(tokenizer, prompt)
    expected = tokenizer(word, add_special_tokens=False).input_ids  # a word after a space, alone: the same pieces
    assert len(slots) == pieces == len(expected) and [ids[s] for s in slots] == expected
    assert slots == list(range(slots[0], slots[0] + len(slots)))


def test_punctuation_inside_a_stretch_and_occurrences(tokenizer):
    token_map = xattn.TokenMap(tokenizer, "a cat, a dog.")
    ids = padded_ids(tokenizer, "a cat, a dog.")
    comma = token_map.indices(",")
    assert tokenizer.convert_ids_to_tokens([ids[s] for s in comma]) == [","]  # cut from "cat," by offsets
    assert token_map.indices("a") == [0, 3] and token_map.indices("a#2") == [3]
    # T5 keeps case ("Red" is 4 pieces, "red" one), lookups ignore it as for CLIP: both occurrences
    assert xattn.TokenMap(tokenizer, "a Red circle on a red square").indices("red") == [1, 2, 3, 4, 8]


def test_no_start_token(tokenizer):
    token_map = xattn.TokenMap(tokenizer, "a red circle")
    with pytest.raises(xattn.TokenError, match="no start token"):
        token_map.indices("<start>")
    assert token_map.word_at(0) == "a" and token_map.word_at(3) == "<end>" and token_map.word_at(4) == "<pad>"
    assert start_slots(tokenizer) == 0 and is_sentencepiece(tokenizer)
    assert start_slots(clip_tokenizer()) == 1 and not is_sentencepiece(clip_tokenizer())


def test_a_long_prompt_is_cut_before_the_end_token(tokenizer):
    prompt = "a red circle and a blue square on a green triangle"
    with pytest.warns(UserWarning, match="were cut"):
        token_map = xattn.TokenMap(tokenizer, prompt, max_length=8)  # as a pipeline's max_sequence_length=8
    ids = tokenizer(prompt, padding="max_length", max_length=8, truncation=True).input_ids
    assert token_map.end_slot == 7 and ids[7] == tokenizer.eos_token_id
    assert token_map.indices("square") == [ids.index(tokenizer.convert_tokens_to_ids("\u2581square"))]
    with pytest.raises(xattn.TokenError, match="was cut"):
        token_map.indices("triangle")

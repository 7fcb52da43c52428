"""PartsTokenMap: CLIP's 77 slots then T5's, checked against each tokenizer's own ids."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

import xattn
from tiny_models import tokenizer as clip_tokenizer
from tiny_t5 import t5_tokenizer
from xattn.token_parts import PartsTokenMap


def parts(prompt, t5_length):
    with pytest.warns(UserWarning, match="cut") if len(prompt.split()) > 75 else nullcontext():
        clip = xattn.TokenMap(clip_tokenizer(), prompt)
    return PartsTokenMap([(0, clip), (77, xattn.TokenMap(t5_tokenizer(), prompt, max_length=t5_length))])


def test_a_word_cut_from_clip_keeps_its_t5_slots():
    prompt = " ".join(["a red circle"] * 26) + " and a blue square"  # 82 words: CLIP keeps 75
    token_map = parts(prompt, t5_length=90)
    t5_ids = t5_tokenizer()(prompt, padding="max_length", max_length=90).input_ids
    square = t5_tokenizer().convert_tokens_to_ids("\u2581square")
    assert token_map.indices("square") == [77 + t5_ids.index(square)]  # not in CLIP's part at all
    assert len(token_map.indices("circle")) == 25 + 26  # CLIP kept 25 of them, T5 all 26
    assert token_map.indices("<start>") == [0] and token_map.end_slot == 77 + t5_ids.index(1)
    assert token_map.word_at(77 + t5_ids.index(square)) == "square" and token_map.max_length == 77 + 90


def test_words_merge_across_parts_and_parts_must_not_overlap():
    token_map = parts("a red circle on a red square", t5_length=16)
    clip_ids = clip_tokenizer()("a red circle on a red square").input_ids
    assert token_map.indices("red#2") == [6, 77 + 5]
    assert clip_ids[6] == clip_tokenizer()("red", add_special_tokens=False).input_ids[0]
    assert [w.text for w in token_map.words] == ["a", "red", "circle", "on", "a", "red", "square"]
    assert token_map.words[1].slots == (2, 77 + 1)
    with pytest.raises(ValueError, match="overlaps"):
        PartsTokenMap([(0, xattn.TokenMap(clip_tokenizer(), "a")), (70, xattn.TokenMap(t5_tokenizer(), "a"))])

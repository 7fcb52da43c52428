"""SD3 with its T5 encoder: the text is CLIP's 77 slots then T5's, and a word has slots in each.

A tiny StableDiffusion3Pipeline with CLIP-L, CLIP-G and a tiny T5 encoder
(tests/tiny_t5.py), saved and loaded back. Slots are checked against each
tokenizer's own ids; Reweight and Capture against a ``probs`` hook written
with those slots.
"""

from __future__ import annotations

import pytest
import torch

import xattn
from tiny_t5 import t5_encoder, t5_tokenizer
from xattn.token_parts import PartsTokenMap

PROMPT = "a red circle"
T5_LENGTH = 16  # max_sequence_length


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    from joint_reference import sd3_pipeline

    folder = tmp_path_factory.mktemp("sd3_t5")
    clip_only = sd3_pipeline(folder / "clip")
    StableDiffusion3Pipeline(**{**clip_only.components, "text_encoder_3": t5_encoder(hidden=32),
                                "tokenizer_3": t5_tokenizer(max_length=T5_LENGTH)}).save_pretrained(folder / "t5")
    loaded = StableDiffusion3Pipeline.from_pretrained(folder / "t5", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def call(pipe, prompt=PROMPT):
    with torch.no_grad():
        return pipe(prompt, negative_prompt="", num_inference_steps=2, guidance_scale=3.0, height=16, width=24,
                    max_sequence_length=T5_LENGTH, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_a_word_has_slots_in_the_clip_and_the_t5_part(pipe):
    layouts = []
    with xattn.hooks(pipe, xattn.Hook("probs", lambda p, ctx: layouts.append((ctx.layout, p.shape)), "kind=joint")):
        call(pipe)
    layout, shape = layouts[0]
    assert shape[-1] == 77 + T5_LENGTH
    token_map = layout.token_map(0)
    assert isinstance(token_map, PartsTokenMap)
    clip_ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
    t5_ids = pipe.tokenizer_3(PROMPT, padding="max_length", max_length=T5_LENGTH).input_ids
    for word in ("a", "red", "circle"):
        slots = token_map.indices(word)
        clip_slots, t5_slots = [s for s in slots if s < 77], [s - 77 for s in slots if s >= 77]
        assert [clip_ids[s] for s in clip_slots] == pipe.tokenizer(word, add_special_tokens=False).input_ids
        assert [t5_ids[s] for s in t5_slots] == pipe.tokenizer_3(word, add_special_tokens=False).input_ids
    assert token_map.indices("circle") == [3, 77 + 2]
    assert token_map.indices("<end>") == [4, 77 + t5_ids.index(pipe.tokenizer_3.eos_token_id)]
    assert token_map.word_at(79) == "circle" and token_map.end_slot == 77 + 3


def zero_slots(slots):
    def hook(p, ctx):
        p = p.clone()
        for row in ctx.layout.row_indices(cond=True):
            p[row, :, :, slots] = 0
        return p
    return hook


def test_reweight_and_word_maps_use_both_parts(pipe):
    with xattn.hooks(pipe, xattn.Reweight({"circle": 0})):
        got = call(pipe)
    with xattn.hooks(pipe, xattn.Hook("probs", zero_slots([3, 79]), "kind=joint")):
        expected = call(pipe)
    with xattn.hooks(pipe, xattn.Hook("probs", zero_slots([3]), "kind=joint")):
        clip_only = call(pipe)
    assert (got - expected).abs().max() <= 1e-5 and (got - clip_only).abs().max() > 1e-6
    seen = []

    def keep(p, ctx):
        row = ctx.layout.row_indices(cond=True)[0]
        seen.append(p[row, :, :, [3, 79]].double().sum(dim=-1).mean(dim=0))  # [i]: the word, heads averaged

    every_slot, prompt_slots = xattn.Capture(slots="all"), xattn.Capture()  # the latter sums T5's padding
    with xattn.hooks(pipe, every_slot, prompt_slots, xattn.Hook("probs", keep, "kind=joint")):
        call(pipe)
    expected_map = (sum(seen) / len(seen)).view(8, 12)
    for capture in (every_slot, prompt_slots):
        got_map = capture.maps().word("circle", normalize=False, size=(8, 12))
        assert (got_map.double() - expected_map).abs().max() <= 1e-6
    assert prompt_slots.maps().columns == list(range(77 + 4))  # through T5's end token, then one padding column

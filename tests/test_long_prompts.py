"""Long prompts: A1111's chunks (comma backtracking, BREAK), TokenMap across chunks, encoding chunk by chunk.

References: slot layouts derived by hand from A1111's documented rules, and
diffusers' own ``encode_prompt`` of each chunk's text for the embeddings.
"""

from __future__ import annotations

import pytest
import torch

import xattn
import xattn.prompts
from xattn.prompts import LongPromptTokenizer, encode_prompt, parse_prompt
from xattn.prompts.chunks import place_tokens
from xattn.prompts.encode import token_chunks

C = ","  # the comma token of the streams below; other tokens are "w"


def _slots(stream, backtrack=20):
    layout = place_tokens(stream, C, backtrack)
    return list(layout.slots), list(layout.chunk_lengths)


def test_75_tokens_fill_one_chunk_and_the_76th_opens_the_next():
    slots, lengths = _slots(["w"] * 75)
    assert slots == list(range(1, 76)) and lengths == [75]
    slots, lengths = _slots(["w"] * 76)
    assert slots[-1] == 77 + 1 and lengths == [75, 1]


def test_break_closes_the_chunk_and_a_leading_break_leaves_an_empty_one():
    assert _slots(["w", None, "w"]) == ([1, 78], [1, 1])
    assert _slots([None, "w"]) == ([78], [0, 1])
    assert _slots(["w", None]) == ([1], [1])
    assert _slots([]) == ([], [0])


def test_comma_backtracking_moves_the_words_after_the_last_comma():
    # 70 words, a comma (index 70), then 10 words: when the chunk is full the comma is 5 back (<= 20)
    stream = ["w"] * 70 + [C] + ["w"] * 10
    slots, lengths = _slots(stream)
    assert slots[70] == 71  # the comma stays in chunk 0
    assert slots[71] == 78  # the first word after it opens chunk 1
    assert lengths == [71, 10]


def test_no_backtracking_past_20_tokens_or_when_disabled():
    stream = ["w"] * 50 + [C] + ["w"] * 30  # the comma is 24 back when the chunk fills
    assert _slots(stream)[1] == [75, 6]
    stream = ["w"] * 70 + [C] + ["w"] * 10
    assert _slots(stream, backtrack=0)[1] == [75, 6]


LONG = " ".join(["a red circle,"] * 30) + " and a (giraffe:1.5) in the corner"


def test_token_map_spans_chunks_and_weighted_word_lands_in_chunk_two(sd1_pipe):
    tokenizer = sd1_pipe.tokenizer
    token_map = xattn.TokenMap(LongPromptTokenizer(tokenizer), LONG)
    assert token_map.prompt == parse_prompt(LONG).text  # located in the clean text
    slots = token_map.indices("giraffe")
    assert all(slot >= 77 for slot in slots) and token_map.max_length == 77 * 2
    rows, weights = token_chunks(tokenizer, parse_prompt(LONG))
    flat_ids = [token for row in rows for token in row]
    flat_weights = [weight for row in weights for weight in row]
    assert [flat_ids[s] for s in slots] == tokenizer("giraffe", add_special_tokens=False).input_ids
    assert all(flat_weights[s] == 1.5 for s in slots)
    assert rows[1][0] == tokenizer.bos_token_id and len(rows) == 2 and all(len(row) == 77 for row in rows)


def test_fragments_are_tokenized_one_by_one(sd1_pipe):
    token_map = xattn.TokenMap(LongPromptTokenizer(sd1_pipe.tokenizer), "a (red)dish cup")
    assert token_map.indices("red") == [2] and token_map.indices("dish") == [3]


def test_a_cut_word_says_it_was_cut_and_where(sd1_pipe):
    tokenizer = LongPromptTokenizer(sd1_pipe.tokenizer, max_chunks=1)
    token_map = xattn.TokenMap(tokenizer, LONG)
    with pytest.raises(xattn.TokenError, match="'giraffe' was cut.*cut starts at character"):
        token_map.indices("giraffe")
    reweight = xattn.Reweight.from_prompt(LONG)
    span = reweight.spans[-1]
    with pytest.raises(xattn.TokenError, match=r"\('giraffe'\) were cut.*from character"):
        token_map.span_indices(span.start, span.end)


def test_plain_token_map_names_the_cut_for_a_span(sd1_pipe):
    prompt = parse_prompt(LONG).text
    with pytest.warns(UserWarning, match="giraffe"):
        token_map = xattn.TokenMap(sd1_pipe.tokenizer, prompt)
    start = prompt.index("giraffe")
    with pytest.raises(xattn.TokenError, match="were cut"):
        token_map.span_indices(start, start + len("giraffe"))


def _diffusers_embeds(pipe, text):
    embeds, _ = pipe.encode_prompt(text, "cpu", 1, False)
    return embeds


def test_each_chunk_is_the_pipelines_own_encoding_of_its_text(sd1_pipe):
    embeds = encode_prompt(sd1_pipe, "a red circle BREAK a blue square", negative_prompt="blurry", emphasis=False)
    assert embeds.prompt_embeds.shape[1] == 154
    assert torch.equal(embeds.prompt_embeds[:, :77], _diffusers_embeds(sd1_pipe, "a red circle"))
    assert torch.equal(embeds.prompt_embeds[:, 77:], _diffusers_embeds(sd1_pipe, "a blue square"))
    # the negative prompt is padded with a chunk of the empty prompt
    assert torch.equal(embeds.negative_prompt_embeds[:, :77], _diffusers_embeds(sd1_pipe, "blurry"))
    assert torch.equal(embeds.negative_prompt_embeds[:, 77:], _diffusers_embeds(sd1_pipe, ""))


def test_emphasis_is_a1111s_scale_then_restore_the_chunk_mean(sd1_pipe):
    with torch.no_grad():
        sd1_pipe.text_encoder.final_layer_norm.bias += 0.5  # a mean well away from 0
    plain = _diffusers_embeds(sd1_pipe, "a red circle")
    weights = torch.ones(1, 77, 1)
    weights[0, 2] = 1.5
    scaled = plain * weights
    expected = scaled * (plain.mean() / scaled.mean())
    got = encode_prompt(sd1_pipe, "a (red:1.5) circle").prompt_embeds
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_sdxl_uses_both_encoders_and_the_first_chunks_pooled_output(sdxl_pipe):
    embeds = encode_prompt(sdxl_pipe, "a red circle BREAK a blue square", emphasis=False)
    whole, _, pooled, _ = sdxl_pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    second, *_ = sdxl_pipe.encode_prompt("a blue square", device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(embeds.prompt_embeds, torch.cat([whole, second], dim=1), atol=1e-6)
    assert torch.allclose(embeds.pooled_prompt_embeds, pooled, atol=1e-6)
    assert set(embeds.pipeline_kwargs()) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                             "negative_pooled_prompt_embeds"}


def test_reweight_acts_on_a_word_in_the_second_chunk_under_guidance(sd1_pipe):
    embeds = encode_prompt(sd1_pipe, LONG, emphasis=False)
    reweight = xattn.Reweight.from_prompt(LONG)
    seen = []
    observe = xattn.Hook("value_scale", lambda x, ctx: seen.append((x.clone(), ctx.layout)), "kind=cross")
    with xattn.hooks(sd1_pipe, reweight, observe, prompts=[LONG], tokenizer=embeds.tokenizer):
        sd1_pipe(**embeds.pipeline_kwargs(), num_inference_steps=1, guidance_scale=5.0, height=32, width=32,
                 output_type="latent")
    weights, layout = seen[0]
    cond = layout.row_indices(cond=True)[0]
    giraffe = embeds.token_map.indices("giraffe")
    assert weights.shape[1] == 154 and min(giraffe) >= 77
    assert all(weights[cond, slot].item() == 1.5 for slot in giraffe)
    assert int((weights[cond] != 1).sum()) == len(giraffe)


def test_compel_without_emphasis_is_the_plain_encoding_of_its_words(sd1_pipe):
    plain = encode_prompt(sd1_pipe, "a red++ circle", syntax="compel", emphasis=False)
    assert torch.equal(plain.prompt_embeds, _diffusers_embeds(sd1_pipe, "a red circle"))


COMPEL_PROMPTS = ["a red++ circle and a blue square", "a (red circle)0.5 and a blue square",
                  "a red circle and a blue-- square, (green)1.3", '"a red circle"0 and a blue square',
                  "a ((red)1.4 circle)0.7 and a blue square"]


@pytest.mark.parametrize("prompt", COMPEL_PROMPTS)
def test_compel_dialect_embeddings_equal_compels(sd1_pipe, prompt):
    compel = pytest.importorskip("compel")
    with torch.no_grad():
        sd1_pipe.text_encoder.final_layer_norm.bias += 0.5  # not needed by the formula; keeps values away from 0
        expected = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder)(prompt)
    got = encode_prompt(sd1_pipe, prompt, syntax="compel").prompt_embeds
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6


def test_compel_formula_splits_long_prompts_its_own_way(sd1_pipe):  # against compel: test_prompt_compel_long.py
    assert encode_prompt(sd1_pipe, "a red++ circle, " * 20, syntax="compel").prompt_embeds.shape[1] == 154
    with pytest.raises(xattn.prompts.UnsupportedSyntaxError, match="no compel meaning"):
        encode_prompt(sd1_pipe, "a red++ circle, " * 20, syntax="compel", max_chunks=2)

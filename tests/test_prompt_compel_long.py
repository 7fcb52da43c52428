"""compel's long prompts (``truncate_long_prompts=False``): its own splitting, its embeddings, and TokenMap on them.

References: compel 2.5.1 itself (the ``test`` extra) for embeddings and token ids;
split points derived by hand from compel's documented rule (sentence end, then
phrase end, then word end, then 75 tokens) for the layout.
"""

from __future__ import annotations

import pytest
import torch

import xattn
from xattn.prompts import LongPromptTokenizer, UnsupportedSyntaxError, encode_prompt, parse_prompt
from xattn.prompts.chunks import place_compel_tokens

compel = pytest.importorskip("compel")


def _split(pieces, truncate=False):
    return list(place_compel_tokens(pieces, truncate).chunk_lengths)


def test_compel_splits_after_the_last_sentence_then_phrase_then_word_end():
    words = ["w</w>"] * 80
    assert _split(words) == [75, 5]  # every token ends a word: the 75th
    sentence = ["w</w>"] * 40 + [".</w>"] + ["w</w>"] * 20 + [",</w>"] + ["w</w>"] * 30
    assert _split(sentence) == [41, 51]  # the '.' wins over the later ','
    phrase = ["w</w>"] * 60 + [",</w>"] + ["w</w>"] * 30
    assert _split(phrase) == [61, 30]
    pieces = ["w</w>"] * 70 + ["ab", "cd", "ef", "gh", "ij", "kl</w>"]  # a word of 6 pieces over the 75th
    assert _split(pieces) == [70, 6]
    assert _split(["ab"] * 80) == [75, 5]  # no word end at all: cut at 75
    assert _split(["w</w>"] * 75) == [75]
    assert _split([]) == [0]


def test_compel_truncation_cuts_each_prompt_after_75_and_and_starts_new_chunks():
    layout = place_compel_tokens(["w</w>"] * 80 + [None] + ["w</w>"] * 3, truncate=True)
    assert list(layout.chunk_lengths) == [75, 3]
    assert all(slot >= 154 for slot in layout.slots[75:80])  # cut: past every chunk
    assert list(layout.slots[80:]) == [78, 79, 80]


LONG_PROMPTS = [
    "a red circle and a blue square. " * 12 + "a (giraffe)1.4 in the corner",
    "a red circle, a blue square, " * 14 + "a green-- triangle",
    " ".join(["word"] * 70) + " (a long weighted phrase crossing the chunk boundary)0.6 and more words",
    "a red circle and a blue square. " * 25 + "a giraffe++ at the end",
    '("' + "a red circle, " * 30 + 'a giraffe", "a blue square").blend(0.6, 0.4)',
    '("' + "a red circle. " * 20 + 'a giraffe++", "a blue-- square").and(1, 0.7)',
    "a red circle.swap(" + "square " * 80 + ") in the corner",
]


@pytest.mark.parametrize("prompt", LONG_PROMPTS, ids=[f"long{i}" for i in range(len(LONG_PROMPTS))])
@pytest.mark.parametrize("truncate", [False, True])
def test_long_embeddings_equal_compels(sd1_pipe, prompt, truncate):
    with torch.no_grad():
        sd1_pipe.text_encoder.final_layer_norm.bias += 0.5
        oracle = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder,
                               truncate_long_prompts=truncate)
        expected = oracle(prompt)
    got = encode_prompt(sd1_pipe, prompt, syntax="compel", max_chunks=1 if truncate else None).prompt_embeds
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("prompt", LONG_PROMPTS[:4])
def test_token_map_finds_every_word_where_compel_put_its_tokens(sd1_pipe, prompt):
    oracle = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder,
                           truncate_long_prompts=False)
    with torch.no_grad():
        _, tokens = oracle(prompt, return_tokenization=True)
    ids = tokens[0][0].tolist()
    token_map = xattn.TokenMap(LongPromptTokenizer(sd1_pipe.tokenizer, "compel"), prompt)
    assert token_map.max_length == len(ids)
    for word in token_map.words:
        assert [ids[slot] for slot in word.slots] == sd1_pipe.tokenizer.convert_tokens_to_ids(
            sd1_pipe.tokenizer.tokenize(word.text)), word
    assert min(token_map.words[-1].slots) >= 77  # the last words (weighted in three of them) are in chunk 2+


def test_max_chunks_other_than_one_has_no_compel_meaning(sd1_pipe):
    with pytest.raises(UnsupportedSyntaxError, match="no compel meaning"):
        encode_prompt(sd1_pipe, "a red++ circle", syntax="compel", max_chunks=2)


def test_without_emphasis_the_layout_is_compels_too(sd1_pipe):
    prompt = LONG_PROMPTS[0]
    embeds = encode_prompt(sd1_pipe, prompt, syntax="compel", emphasis=False)
    assert embeds.prompt_embeds.shape[1] == 154
    oracle = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder,
                           truncate_long_prompts=False)
    with torch.no_grad():
        expected = oracle(parse_prompt(prompt, syntax="compel").text)  # the same words, unweighted
    assert (embeds.prompt_embeds - expected).abs().max().item() <= 1e-6


# -- item 5: prompts= with compel's own long-prompt embeddings ----------------------------

PROMPT = "a red circle and a blue square. " * 12 + "a (giraffe)1.4 in the corner"


def _latents(pipe, kwargs, controllers, tokenizer):
    with xattn.hooks(pipe, *controllers, prompts=[PROMPT], tokenizer=tokenizer):
        return pipe(**kwargs, num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_reweight_of_a_chunk_two_word_through_prompts_equals_xattns_own_compel_encode(sd1_pipe):
    oracle = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder,
                           truncate_long_prompts=False)
    with torch.no_grad():
        cond, uncond = oracle(PROMPT), oracle("blurry")
        cond, uncond = oracle.pad_conditioning_tensors_to_same_length([cond, uncond])
    compels = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    tokenizer = LongPromptTokenizer(sd1_pipe.tokenizer, "compel")  # prompts= read compel's way
    assert min(xattn.TokenMap(tokenizer, PROMPT).indices("giraffe")) >= 77

    reweighted = _latents(sd1_pipe, compels, [xattn.Reweight({"giraffe": 3.0})], tokenizer)
    own = encode_prompt(sd1_pipe, PROMPT, negative_prompt="blurry", syntax="compel")
    assert torch.equal(own.prompt_embeds, cond) or (own.prompt_embeds - cond).abs().max().item() <= 1e-6
    through_own = _latents(sd1_pipe, own.pipeline_kwargs(), [xattn.Reweight({"giraffe": 3.0})], own.tokenizer)
    plain = _latents(sd1_pipe, compels, [], tokenizer)
    assert (reweighted - through_own).abs().max().item() <= 1e-5
    assert (reweighted - plain).abs().max().item() > 1e-3


def test_a_plain_tokenizer_on_long_embeddings_says_the_word_was_cut_and_what_to_pass(sd1_pipe):
    oracle = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder,
                           truncate_long_prompts=False)
    with torch.no_grad():
        cond, uncond = oracle.pad_conditioning_tensors_to_same_length([oracle(PROMPT), oracle("")])
    with pytest.raises(xattn.TokenError, match=r"'giraffe' was cut.*LongPromptTokenizer"):
        _latents(sd1_pipe, {"prompt_embeds": cond, "negative_prompt_embeds": uncond},
                 [xattn.Reweight({"giraffe": 3.0})], None)


# -- generated long prompts: punctuation where compel splits, signs before punctuation, weights everywhere -----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VOCAB = st.sampled_from("red blue green circle square triangle cat dog forest corner x-ray".split())
WORD = st.tuples(VOCAB, st.sampled_from(["", "", "+", "++", "-", "--"]),
                 st.sampled_from(["", "", "", ",", ".", ";", ":"])).map("".join)


@st.composite
def long_prompt(draw):
    parts = []
    for _ in range(draw(st.integers(3, 12))):
        text = " ".join(draw(st.lists(WORD, min_size=1, max_size=18)))
        shape = draw(st.sampled_from(["plain", "plain", "group", "quoted"]))
        if shape == "group":
            text = f"({text}){draw(st.sampled_from(['0.5', '1.3', '0.8', '++', '-']))}"
        elif shape == "quoted":
            text = f'"{text}"{draw(st.sampled_from(["0.6", "1.2"]))}'
        parts.append(text)
    return " ".join(parts)


def _spaced(fragments):
    """Words and punctuation of ``(text, weight)`` fragments: compel spaces a group's ``,`` and ``.`` apart."""
    import re

    return [(piece, round(weight, 12)) for text, weight in fragments
            for piece in re.findall(r"[^\s,.;:]+|[,.;:]", text)]


@settings(max_examples=300, deadline=None)
@given(long_prompt())
def test_generated_long_prompts_parse_as_compel_parses_them(prompt):
    oracle = compel.prompt_parser.PromptParser().parse_conjunction(prompt).prompts[0].children
    mine = parse_prompt(prompt, syntax="compel").fragments
    assert _spaced([(f.text, f.weight) for f in mine]) == _spaced([(f.text, f.weight) for f in oracle])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=long_prompt(), truncate=st.booleans())
def test_generated_long_prompts_embed_as_compel_embeds_them(sd1_pipe, prompt, truncate):
    oracle = compel.Compel(tokenizer=sd1_pipe.tokenizer, text_encoder=sd1_pipe.text_encoder,
                           truncate_long_prompts=truncate)
    with torch.no_grad():
        expected = oracle(prompt)
    got = encode_prompt(sd1_pipe, prompt, syntax="compel", max_chunks=1 if truncate else None).prompt_embeds
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6

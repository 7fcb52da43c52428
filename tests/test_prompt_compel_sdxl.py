"""The compel dialect on SDXL, with compel 2.5.1 (the ``test`` extra) as the oracle.

compel's SDXL recipe is ``Compel(tokenizer=[tokenizer, tokenizer_2], text_encoder=[text_encoder,
text_encoder_2], returned_embeddings_type=PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
requires_pooled=[False, True])`` and ``conditioning, pooled = compel(prompt)``. That two-encoder
form fails inside compel 2.5.1 for ``.blend()`` (it joins the two encoders' token lists as
tensors), for weighted ``.and()`` (its empty-prompt reference comes back as a tuple) and wherever it
pads (a long ``.swap()`` or ``.blend()``: the two-encoder provider has no ``empty_z``). There the
oracle is what the two-encoder form computes on the way, one ``Compel`` per encoder (compel's own
``CompelForSDXL`` builds it so), joined along the features, with the pooled vector from compel's
``get_pooled_embeddings`` of the second encoder. Where the two-encoder form runs, the two oracles
are checked equal, bit for bit, before xattn is compared with them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import tiny_models
import xattn
from test_prompt_compel_long import LONG_PROMPTS, long_prompt
from test_prompt_compel_operators import OPERATOR_PROMPTS, operator_prompt
from xattn.capture import Capture
from xattn.prompts import LongPromptTokenizer, encode_prompt

compel = pytest.importorskip("compel")
PENULTIMATE = compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
ONE_FORM_FAILS = (AttributeError, TypeError)  # compel 2.5.1's two-encoder form, see the module's docstring


@pytest.fixture(params=["same pad", "pad !"])
def pipe(request, sdxl_path):
    """The tiny SDXL pipeline; with ``pad !`` its second tokenizer pads with ``!`` as SDXL's real one does."""
    loaded = tiny_models.load_sdxl(sdxl_path)
    if request.param == "pad !":
        from transformers import CLIPTokenizer

        from xattn.assets import clip_tokenizer_path

        loaded.tokenizer_2 = CLIPTokenizer.from_pretrained(clip_tokenizer_path(), pad_token="!")
        assert loaded.tokenizer_2.pad_token_id != loaded.tokenizer.pad_token_id
    return loaded


def _pairs(pipe):
    return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]


@torch.no_grad()
def compel_sdxl(pipe, prompt: str, truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compel's ``(conditioning, pooled)`` for ``prompt`` on SDXL (see the module's docstring)."""
    per_encoder = torch.cat([compel.Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=truncate,
                                           returned_embeddings_type=PENULTIMATE)(prompt)
                             for tokenizer, encoder in _pairs(pipe)], dim=-1)
    second = compel.Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2,
                           returned_embeddings_type=PENULTIMATE, truncate_long_prompts=truncate)
    pooled = second.conditioning_provider.get_pooled_embeddings([prompt])
    both = compel.Compel(tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
                         text_encoder=[pipe.text_encoder, pipe.text_encoder_2], returned_embeddings_type=PENULTIMATE,
                         requires_pooled=[False, True], truncate_long_prompts=truncate)
    try:
        conditioning, both_pooled = both(prompt)
    except ONE_FORM_FAILS:
        return per_encoder, pooled
    assert torch.equal(conditioning, per_encoder) and torch.equal(both_pooled, pooled)
    return conditioning, pooled


def _assert_equal_to_compel(pipe, prompt: str, truncate: bool) -> None:
    expected, pooled = compel_sdxl(pipe, prompt, truncate)
    got = encode_prompt(pipe, prompt, syntax="compel", max_chunks=1 if truncate else None)
    assert got.prompt_embeds.shape == expected.shape
    assert (got.prompt_embeds - expected).abs().max().item() <= 1e-6
    assert got.pooled_prompt_embeds.shape == pooled.shape
    assert (got.pooled_prompt_embeds - pooled).abs().max().item() <= 1e-6


PLAIN = ["a red++ circle", "a red-- circle and a (blue square)0.5", 'a "red circle"1.3 and a (blue)0', "", "a cat",
         "a (tall thin man)++ (picking apricots)0.7, x-ray+"]


@pytest.mark.parametrize("prompt", PLAIN + OPERATOR_PROMPTS)
@pytest.mark.parametrize("truncate", [True, False])
def test_weights_and_operators_equal_compels(pipe, prompt, truncate):
    _assert_equal_to_compel(pipe, prompt, truncate)


@pytest.mark.parametrize("prompt", LONG_PROMPTS, ids=[f"long{i}" for i in range(len(LONG_PROMPTS))])
@pytest.mark.parametrize("truncate", [True, False])
def test_long_prompts_equal_compels(pipe, prompt, truncate):
    _assert_equal_to_compel(pipe, prompt, truncate)


def test_the_pooled_vector_is_the_written_texts_first_window(sdxl_pipe):
    """compel pools the text as written (``++`` and all), cut to one window: not the weighted words."""
    weighted = encode_prompt(sdxl_pipe, "a red++ circle", syntax="compel")
    plain = encode_prompt(sdxl_pipe, "a red circle", syntax="compel")
    assert not torch.equal(weighted.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    long = encode_prompt(sdxl_pipe, LONG_PROMPTS[3], syntax="compel")
    assert long.prompt_embeds.shape[1] > 77 and long.pooled_prompt_embeds.shape == (1, tiny_models.TEXT_DIM)


def test_a_negative_prompt_is_compels_encoding_of_it_and_an_empty_one_is_zeros_then_compels_padding(sdxl_pipe):
    """A written negative prompt: compel's hidden states and pooled vector for it, padded as compel pads.
    An empty one through ``prompt_kwargs``: zeros in its first chunk and pooled vector (the SDXL path's
    ``force_zeros_for_empty_prompt``), the chunks that pad it to a long prompt compel's empty-prompt padding."""
    from xattn.prompts.pipeline import prompt_kwargs

    prompt = LONG_PROMPTS[0]
    embeds = encode_prompt(sdxl_pipe, prompt, "blurry-- and (dark)0.7", syntax="compel")
    negative, negative_pooled = compel_sdxl(sdxl_pipe, "blurry-- and (dark)0.7", truncate=False)
    per_encoder = [compel.Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=False,
                                 returned_embeddings_type=PENULTIMATE) for tokenizer, encoder in _pairs(sdxl_pipe)]
    with torch.no_grad():
        padded = torch.cat([oracle.pad_conditioning_tensors_to_same_length(
            [oracle(prompt), oracle("blurry-- and (dark)0.7")])[1] for oracle in per_encoder], dim=-1)
    assert padded.shape[1] == 154 and torch.equal(padded[:, :77], negative)
    assert (embeds.negative_prompt_embeds - padded).abs().max().item() <= 1e-6
    assert (embeds.negative_pooled_prompt_embeds - negative_pooled).abs().max().item() <= 1e-6

    kwargs = prompt_kwargs(sdxl_pipe, [prompt], None, syntax="compel")
    assert not kwargs["negative_prompt_embeds"][:, :77].any() and not kwargs["negative_pooled_prompt_embeds"].any()
    with torch.no_grad():
        empty_padding = torch.cat([oracle.conditioning_provider.empty_z for oracle in per_encoder], dim=-1)
    assert (kwargs["negative_prompt_embeds"][:, 77:] - empty_padding).abs().max().item() <= 1e-6


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.one_of(operator_prompt(), long_prompt()), truncate=st.booleans())
def test_generated_prompts_equal_compels(sdxl_pipe, prompt, truncate):
    _assert_equal_to_compel(sdxl_pipe, prompt, truncate)


# -- TokenMap, Capture and Reweight on SDXL compel prompts ---------------------------------------

@pytest.mark.parametrize("prompt", ["a red++ circle and a (blue square)0.5"] + LONG_PROMPTS[:4])
def test_token_map_finds_each_word_where_both_encoders_read_it(sdxl_pipe, prompt):
    token_map = xattn.TokenMap(LongPromptTokenizer(sdxl_pipe.tokenizer, "compel"), prompt)
    assert encode_prompt(sdxl_pipe, prompt, syntax="compel").prompt_embeds.shape[1] == token_map.max_length
    for tokenizer, encoder in _pairs(sdxl_pipe):
        oracle = compel.Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=False,
                               returned_embeddings_type=PENULTIMATE)
        with torch.no_grad():
            _, tokens = oracle(prompt, return_tokenization=True)
        ids = tokens[0][0].tolist()
        assert len(ids) == token_map.max_length
        for word in token_map.words:
            assert [ids[slot] for slot in word.slots] == tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word.text))


def _first_cross_site(pipe) -> str:
    return next(site.name for site in xattn.sites(pipe.unet) if site.kind == "cross")


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_reweight_through_the_compel_dialect_changes_the_words_map(request, model):
    """Embeddings from xattn's compel encoder, the rows named through the compel tokenizer; a Reweight read from
    a compel prompt multiplies the word's map at the first cross site, on SDXL as on SD 1.x."""
    pipe = request.getfixturevalue(f"{model}_pipe")
    prompt = "a red circle, " * 8 + "and a blue square in the corner"  # compel splits nothing: one window
    embeds = encode_prompt(pipe, prompt, syntax="compel")
    site = _first_cross_site(pipe)

    def captured(*controllers):
        capture = Capture(f"sites={site}")
        with xattn.hooks(pipe, capture, *controllers, prompts=[prompt], tokenizer=embeds.tokenizer):
            pipe(**embeds.pipeline_kwargs(), num_inference_steps=1, height=32, width=32, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        maps = capture.maps()
        return {word: maps.word(word, normalize=False).double() for word in ("blue", "corner")}

    reweight = xattn.Reweight.from_prompt("a red circle, " * 8 + "and a blue++ square in the corner", syntax="compel")
    assert reweight.prompt == prompt
    plain, weighted = captured(), captured(reweight)
    assert plain["blue"].abs().max() > 0
    assert torch.allclose(weighted["blue"], 1.1**2 * plain["blue"], rtol=1e-4, atol=1e-7)
    assert torch.allclose(weighted["corner"], plain["corner"], rtol=1e-4, atol=1e-7)


# -- xattn generate --syntax compel on an SDXL model folder ----------------------------------------

FAST = ["--steps", "3", "--size", "32", "--seed", "2", "--guidance", "5", "--no-progress"]


def _png(cli, tmp_path, sdxl_path, prompt: str, out: str) -> np.ndarray:
    result = cli("generate", prompt, "--syntax", "compel", "--model", sdxl_path, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(tmp_path / out / "image-0.png").convert("RGB")).astype(int)


def _compels_workflow(pipe, prompt: str) -> np.ndarray:
    conditioning, pooled = compel_sdxl(pipe, prompt, truncate=True)  # compel's default truncation
    with torch.no_grad():
        arrays = pipe(prompt_embeds=conditioning, pooled_prompt_embeds=pooled, num_inference_steps=3,
                      guidance_scale=5.0, width=32, height=32, output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(2)]).images
    return np.asarray(pipe.numpy_to_pil(arrays)[0].convert("RGB")).astype(int)


def test_generate_with_compel_syntax_on_sdxl_is_compels_workflow(cli, sdxl_path, tmp_path):
    """The PNG equals compel's README workflow on SDXL: ``pipe(prompt_embeds=conditioning,
    pooled_prompt_embeds=pooled)`` with no negative prompt, which diffusers turns into zeros
    (``force_zeros_for_empty_prompt``), as xattn's SDXL path does for an empty negative prompt.
    A prompt without weights reaches the pipeline as text, and diffusers' encoding of it is compel's."""
    pipe = tiny_models.load_sdxl(sdxl_path)
    assert pipe.config.force_zeros_for_empty_prompt
    weighted = _png(cli, tmp_path, sdxl_path, "a red++ circle", "weighted")
    assert np.abs(weighted - _compels_workflow(pipe, "a red++ circle")).max() == 0
    plain = _png(cli, tmp_path, sdxl_path, "a red circle", "plain")
    assert np.abs(plain - _compels_workflow(pipe, "a red circle")).max() == 0
    assert np.abs(weighted - plain).max() > 0  # the weight shows in the image

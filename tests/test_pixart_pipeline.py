"""PixArtSigmaPipeline end to end (T5 text, cross-attention transformer), with a tiny T5 built offline.

References: the stock pipeline's own output (no hooks), a ``probs`` hook that
zeroes the word's columns found from the tokenizer's ids directly (for
``Reweight({word: 0})``), and the pipeline's text padding mask (maps put no
mass on padding).
"""
import pytest
import torch

import xattn
from tiny_pixart import pixart_pipeline

PROMPT = "a red circle and a blue square"
CALL = dict(num_inference_steps=3, guidance_scale=4.5, output_type="latent", max_sequence_length=32,
            use_resolution_binning=False, clean_caption=False)


@pytest.fixture(scope="module")
def pipe():
    return pixart_pipeline()


def sample(pipe, prompt=PROMPT):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL).images


def test_no_hooks_is_the_stock_pipeline(pipe):
    stock = sample(pipe)
    with xattn.hooks(pipe):
        hooked = sample(pipe)
    assert (hooked - stock).abs().max().item() <= 1e-5


def test_word_maps_cover_the_patch_grid_and_skip_padding(pipe):
    seen = []
    capture = xattn.Capture()
    with xattn.hooks(pipe, capture, xattn.Hook("probs", lambda probs, ctx: seen.append(probs.detach().clone()),
                                               selector="kind=cross")):
        sample(pipe)
    maps = capture.maps()
    assert maps.resolutions == [(4, 4)]  # 8x8 latent in 2x2 patches
    assert len(seen) == 2 * 3 and seen[0].shape == (2, 2, 16, 32)  # 2 cross layers x 3 steps; [uncond, cond]
    for row, prompt in enumerate(("", PROMPT)):  # the pipeline's negative prompt is ""
        words = len(pipe.tokenizer(prompt).input_ids)  # pieces + </s>; the rest is padding
        assert all(p[row, ..., words:].abs().max().item() == 0 for p in seen)  # the padding mask holds
        assert all(torch.allclose(p[row, ..., :words].sum(-1), torch.ones(()), atol=1e-5) for p in seen)


def test_reweight_zero_equals_zeroing_the_words_columns_by_hand(pipe):
    ids = pipe.tokenizer(PROMPT).input_ids
    red = ids.index(pipe.tokenizer.convert_tokens_to_ids("\u2581red"))

    def zero_red(probs, ctx):
        cond = ctx.layout.cond_rows()
        probs[cond, :, :, red] = 0
        return probs

    with xattn.hooks(pipe, xattn.Reweight({"red": 0.0}, mode="scale")):
        ours = sample(pipe)
    with xattn.hooks(pipe, xattn.Hook("probs", zero_red, selector="kind=cross")):
        by_hand = sample(pipe)
    assert (ours - by_hand).abs().max().item() <= 1e-5
    assert (ours - sample(pipe)).abs().max().item() > 1e-4  # zeroing the word changed the sample

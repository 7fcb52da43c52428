"""LocalBlend: masks from word maps at any resolution, source latents kept outside them."""

from __future__ import annotations

import pytest
import torch

import tiny_models
import xattn
from xattn import BatchLayout, HookContext, Row, Run, Site, TokenMap
from xattn.edit import EditError, LocalBlend, Replace

SOURCE, TARGET = "a red circle", "a green circle"
CIRCLE = 3  # slot of "circle" in both prompts: <start> a red circle


@pytest.fixture(scope="module")
def layout():
    tokenizer = tiny_models.tokenizer()
    return BatchLayout(rows=(Row(True, 0, 0), Row(True, 1, 0)), prompts=(SOURCE, TARGET),
                       token_maps=(TokenMap(tokenizer, SOURCE), TokenMap(tokenizer, TARGET)))


def begin(blend, layout, num_steps=4):
    """What the session does at a run's first denoiser call."""
    blend.begin_run(Run(layout, num_steps, (4, 4)))
    return blend


def feed(blend, layout, res, hot_pixels, step=0, num_steps=4):
    """One cross-attention call whose 'circle' map is 1 at ``hot_pixels[row]`` (flat index) and 0 elsewhere."""
    height, width = res
    site = Site("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "cross", "down", 2, 4)
    ctx = HookContext(site, "probs", res, step, num_steps, 999.0, layout)
    assert blend.active(ctx)
    probs = torch.zeros(2, 2, height * width, layout.token_maps[0].max_length)  # [b, h, i, j]
    probs[..., 0] = 1.0  # everything on <start>
    for row, pixel in hot_pixels.items():
        probs[row, :, pixel, 0] = 0.0
        probs[row, :, pixel, CIRCLE] = 1.0
    assert blend.probs(probs, ctx) is None  # observe only


def test_mask_is_the_upsampled_hot_pixel_and_source_is_kept_outside(layout):
    blend = begin(LocalBlend("circle", threshold=0.4, dilate=0), layout)
    # map 3x5, latent 6x10: pixel (1, 2) of the target's map covers latent rows 2..3, columns 4..5
    feed(blend, layout, (3, 5), {1: 1 * 5 + 2})
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    out = blend.on_step_end(0, latents.clone())
    expected = torch.zeros(6, 10, dtype=torch.bool)
    # bilinear x2 of one pixel: .75 * .75 on the 2x2 block it covers, .75 * .25 beside it (1/3 of the peak)
    expected[2:4, 4:6] = True
    assert torch.equal(blend.last_masks[0], expected)
    assert torch.equal(out[0], latents[0])  # the source row is never changed
    assert torch.equal(out[1][:, expected], latents[1][:, expected])
    assert torch.equal(out[1][:, ~expected], latents[0][:, ~expected])


def test_mask_is_the_union_of_source_and_target_words_and_widens_by_dilate(layout):
    blend = begin(LocalBlend(["circle"], threshold=0.3, dilate=1), layout)
    feed(blend, layout, (4, 4), {0: 0, 1: 15})  # source's circle top-left, target's bottom-right
    latents = torch.randn(2, 4, 4, 4)
    blend.on_step_end(0, latents)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = expected[2:, 2:] = True  # each hot pixel and its 3x3 neighbourhood
    assert torch.equal(blend.last_masks[0], expected)


def test_maps_of_several_resolutions_average_on_the_latent_grid(layout):
    blend = begin(LocalBlend("circle", threshold=0.3, dilate=0), layout)
    feed(blend, layout, (4, 4), {1: 0})  # top-left corner at 4x4
    feed(blend, layout, (2, 2), {1: 0})  # and at 2x2
    blend.on_step_end(0, torch.randn(2, 4, 4, 4))
    # The 2x2 map's corner, resized to 4x4, is [1, .75, .25, 0] along each axis; the 4x4 map is a
    # single 1 at (0, 0). Mean: (0,0) = 1, (0,1) = (1,0) = .375, (1,1) = .28125, the rest below .3.
    assert blend.last_masks[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0]]


def test_outside_its_window_blend_changes_nothing(layout):
    blend = begin(LocalBlend("circle", steps="2:4"), layout)
    site = Site("x.attn2", "cross", "down", 2, 4)
    ctx = HookContext(site, "probs", (2, 2), 0, 4, 999.0, layout)
    assert not blend.active(ctx)
    assert blend.on_step_end(0, torch.randn(2, 4, 4, 4)) is None


def test_blend_in_a_pipeline_at_a_non_square_latent_keeps_source_latents_outside_the_mask(sd1_pipe):
    blend = LocalBlend("circle", threshold=0.99, dilate=0)  # random weights: near-flat maps, keep only the peak
    generator = torch.Generator().manual_seed(1)
    shape = (1, 4, 12, 20)  # 24 x 40 pixels with the tiny VAE's factor 2
    latent = torch.randn(shape, generator=generator)
    with xattn.hooks(sd1_pipe, blend, Replace(steps="0:2")):
        out = sd1_pipe([SOURCE, TARGET], latents=latent.expand(2, -1, -1, -1).clone(), height=24, width=40,
                       num_inference_steps=4, guidance_scale=5.0, output_type="latent").images
    mask = blend.last_masks[0]
    assert mask.shape == (12, 20)
    assert 0 < mask.sum() < mask.numel()  # a real, partial mask
    assert torch.equal(out[1][:, ~mask], out[0][:, ~mask])
    assert not torch.equal(out[1][:, mask], out[0][:, mask])


def test_bad_blend_options_are_refused(layout):
    with pytest.raises(EditError, match="one or more words"):
        LocalBlend([])
    with pytest.raises(EditError, match=r"threshold .* in \[0, 1\)"):
        LocalBlend("circle", threshold=1.5)
    with pytest.raises(EditError, match="dilate is a whole number"):
        LocalBlend("circle", dilate=-1)
    with pytest.raises(EditError, match="res"):
        LocalBlend("circle", res="big")
    with pytest.raises(EditError, match=r"\['hat'\] are neither in the source 'a red circle' nor in the target"):
        begin(LocalBlend("hat"), layout)

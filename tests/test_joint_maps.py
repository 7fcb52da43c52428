"""Word maps on joint sites (SD3, Flux): the image->text block is a text map like a cross map.

A bare transformer call named by ``prompts=`` (CLIP's 77 text slots); the
expected map is the float64 reference's image->text probabilities at the
word's slots, heads averaged, conditional row, mean over the joint sites.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xattn
from joint_reference import flux_inputs, flux_model, recording, reference, sd3_inputs, sd3_model
from tiny_models import tokenizer

PROMPTS = ["a red circle", "a circle and a square"]
FAMILIES = {  # family -> (build, inputs, patch grid, text first, image tokens at single-stream sites)
    "sd3": (sd3_model, sd3_inputs, (4, 6), False, None),
    "flux": (flux_model, flux_inputs, (3, 5), True, 15),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    build = FAMILIES[request.param][0]
    return request.param, build(tmp_path_factory.mktemp("joint_maps") / request.param)


def expected_word(model, family, records, slots, prompt):
    """float64: the image->text probabilities at ``slots``, summed, heads averaged, mean over joint sites."""
    _, _, grid, text_first, single_tokens = FAMILIES[family]
    modules = dict(model.named_modules())
    maps = []
    for name, record in records.items():
        tokens = single_tokens if record["context"] is None else None
        probs = reference(modules[name], record, family=family, text_first=text_first, image_tokens=tokens)["probs"]
        maps.append(probs[prompt][:, :, slots].sum(dim=-1).mean(dim=0))  # [i]
    return (sum(maps) / len(maps)).view(grid)


def test_word_maps_on_joint_sites_equal_float64(family):
    family, model = family
    _, make_inputs, grid, _, _ = FAMILIES[family]
    capture = xattn.Capture()
    joint = [site.name for site in xattn.sites(model) if site.kind == "joint"]
    with recording(model, joint) as records, torch.no_grad(), \
            xattn.hooks(model, capture, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**make_inputs(seed=13, text=77))
    maps = capture.maps()
    latent = (grid[0] * 2, grid[1] * 2)  # the patch grid is half the latent (SD3 patches, Flux packing)
    assert maps.resolutions == [grid] and maps.image_size == latent  # a bare call: the image is the latent
    assert maps.words(1) == ["a#1", "circle", "and", "a#2", "square"]
    for prompt, word, slots in ((0, "circle", [3]), (1, "circle", [2]), (1, "a", [1, 4]), (0, "red circle", [2, 3])):
        assert xattn.TokenMap(tokenizer(), PROMPTS[prompt]).indices(word) == slots
        expected = expected_word(model, family, records, slots, prompt)  # [h, w] on the patch grid
        got = maps.word(word, prompt, normalize=False, size=grid)
        assert got.shape == grid and (got.double() - expected).abs().max() <= 1e-5, (word, prompt)
        upsampled = F.interpolate(expected[None, None], size=latent, mode="bicubic", align_corners=False)[0, 0]
        full = maps.word(word, prompt, normalize=False)  # default: the image's size
        assert full.shape == latent and (full.double() - upsampled.clamp(min=0)).abs().max() <= 1e-5
    # Shares of every text slot (the padding summed) add up to the text's share of the joint softmax (< 1).
    shares = maps.token_totals(0)
    text_share = expected_word(model, family, records, list(range(77)), 0).mean().item()
    assert abs(sum(shares.values()) - text_share) <= 1e-5 and text_share < 1
    assert abs(shares["circle"] - expected_word(model, family, records, [3], 0).mean().item()) <= 1e-6


def test_sd3_pipeline_word_map_has_the_image_size(tmp_path):
    from joint_reference import sd3_pipeline

    pipe = sd3_pipeline(tmp_path / "pipe")
    capture = xattn.Capture()
    with torch.no_grad(), xattn.hooks(pipe, capture):
        pipe("a red circle", num_inference_steps=2, height=16, width=24, max_sequence_length=16,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    maps = capture.maps()
    image = (16, 24)  # the tiny VAE does not scale: image = latent = 2 x the patch grid
    assert maps.resolutions == [(8, 12)] and maps.image_size == image and maps.num_steps == 2
    heat = maps.word("circle")
    assert heat.shape == image and heat.max() == 1 and heat.min() == 0
    with pytest.raises(xattn.TokenError):
        maps.word("square")

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
import xattn.joint
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


ALL_BLOCKS = ("image->text", "image->image", "text->image", "text->text")


def expected_block(model, family, records, name, prompt):
    """float64: one block of the whole joint softmax, heads averaged, mean over the joint sites."""
    _, _, _, text_first, single_tokens = FAMILIES[family]
    modules = dict(model.named_modules())
    blocks = []
    for site, record in records.items():
        tokens = single_tokens if record["context"] is None else None
        ref = reference(modules[site], record, family=family, text_first=text_first, image_tokens=tokens)
        parts = {"image": ref["rows"], "text": ref["columns"]}
        queries, keys = (parts[side] for side in name.split("->"))
        blocks.append(ref["whole"][prompt][:, queries, keys].mean(dim=0))  # [q, k]
    return sum(blocks) / len(blocks)


@pytest.mark.parametrize("per_step", [False, True], ids=["aggregated", "per-step"])
def test_every_kept_joint_block_equals_float64(family, per_step):
    family, model = family
    _, make_inputs, grid, _, _ = FAMILIES[family]
    capture = xattn.Capture(blocks=ALL_BLOCKS, slots="all", per_step=per_step, storage_dtype=torch.float32)
    joint = [site.name for site in xattn.sites(model) if site.kind == "joint"]
    with recording(model, joint) as records, torch.no_grad(), \
            xattn.hooks(model, capture, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**make_inputs(seed=13, text=77))
    maps = capture.maps()
    image = grid[0] * grid[1]
    shapes = {"image->text": (image, 77), "image->image": (image, image), "text->image": (77, image),
              "text->text": (77, 77)}
    for prompt in range(2):
        for name in ALL_BLOCKS:
            got = maps.block(name, prompt)
            expected = expected_block(model, family, records, name, prompt)
            assert got.shape == shapes[name] and (got.double() - expected).abs().max() <= 1e-5, (name, prompt)
        # every query's four blocks add up to its whole softmax row
        rows_img = maps.block("image->text", prompt).sum(-1) + maps.block("image->image", prompt).sum(-1)
        rows_txt = maps.block("text->text", prompt).sum(-1) + maps.block("text->image", prompt).sum(-1)
        assert torch.allclose(rows_img, torch.ones(image), atol=1e-5) and torch.allclose(rows_txt, torch.ones(77),
                                                                                           atol=1e-5)
    # word maps read the image->text block alone, as without blocks=
    plain = xattn.Capture(slots="all", per_step=per_step, storage_dtype=torch.float32)
    with torch.no_grad(), xattn.hooks(model, plain, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**make_inputs(seed=13, text=77))
    assert torch.equal(maps.word("circle", normalize=False), plain.maps().word("circle", normalize=False))
    assert maps.token_totals(1) == pytest.approx(plain.maps().token_totals(1))


def test_joint_blocks_count_against_the_budget_and_heads_are_chosen(family):
    family, model = family
    _, make_inputs, grid, _, _ = FAMILIES[family]
    plain = xattn.Capture(budget=None)
    with torch.no_grad(), xattn.hooks(model, plain, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**make_inputs(seed=13, text=77))
    image, rows = grid[0] * grid[1], 2
    extra = rows * image * image * 4  # one float32 image->image running sum (one resolution, heads averaged)
    both = xattn.Capture(blocks=("image->image",), budget=None)
    with torch.no_grad(), xattn.hooks(model, both, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**make_inputs(seed=13, text=77))
    assert both.planned_bytes == plain.planned_bytes + extra == both.bytes_held()
    tight = xattn.Capture(blocks=("image->image",), budget=plain.planned_bytes + extra - 1)
    with pytest.raises(xattn.capture.CaptureBudgetError, match="blocks=") as error, torch.no_grad(), \
            xattn.hooks(model, tight, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**make_inputs(seed=13, text=77))
    assert "image->image" in str(error.value) and tight.bytes_held() == 0
    heads = xattn.Capture("heads=1", blocks=("text->text",), keep_heads=True)
    joint = [site.name for site in xattn.sites(model) if site.kind == "joint"]
    with recording(model, joint) as records, torch.no_grad(), \
            xattn.hooks(model, heads, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**make_inputs(seed=13, text=77))
    _, _, _, text_first, single_tokens = FAMILIES[family]
    modules = dict(model.named_modules())
    per_site = []
    for site, record in records.items():
        ref = reference(modules[site], record, family=family, text_first=text_first,
                        image_tokens=single_tokens if record["context"] is None else None)
        per_site.append(ref["whole"][0][1, ref["columns"], ref["columns"]])
    expected = sum(per_site) / len(per_site)
    assert (heads.maps().block("text->text", heads=[1]).double() - expected).abs().max() <= 1e-5


def test_blocks_are_refused_off_joint_sites_and_by_unknown_name(sd1_pipe, family):
    name, model = family
    with pytest.raises(xattn.capture.CaptureBlocksError, match="unknown joint block"):
        xattn.Capture(blocks=("image->txt",))
    with pytest.raises(xattn.capture.CaptureBlocksError, match="not joint: down_blocks"):
        with xattn.hooks(sd1_pipe, xattn.Capture(blocks=("text->image",))):
            pass
    if name == "sd3":  # SD3.5's attn2 is a self site served by a joint processor
        wide = xattn.Capture(blocks=("text->text",), self_attention=True, self_res=64)
        with pytest.raises(xattn.capture.CaptureBlocksError, match=r"\(self\)"), \
                xattn.hooks(model, wide, prompts=PROMPTS, tokenizer=tokenizer()):
            pass
    capture = xattn.Capture()
    with torch.no_grad(), xattn.hooks(model, capture, prompts=PROMPTS, tokenizer=tokenizer()):
        model(**FAMILIES[name][1](seed=13, text=77))
    with pytest.raises(LookupError, match=r"Capture\(blocks=\('text->image',\)\)"):
        capture.maps().block("text->image")


def test_the_fused_path_runs_wherever_no_map_is_needed(tmp_path, monkeypatch):
    from joint_reference import sd3_pipeline

    pipe = sd3_pipeline(tmp_path / "pipe")
    explicit_steps = []
    original = xattn.joint._explicit

    def counting(active, *args, **kwargs):
        explicit_steps.append(active.context.step)
        return original(active, *args, **kwargs)

    monkeypatch.setattr(xattn.joint, "_explicit", counting)

    def call():
        with torch.no_grad():
            return pipe("a red circle", num_inference_steps=2, height=16, width=24, max_sequence_length=16,
                        output_type="latent", generator=torch.Generator().manual_seed(0)).images

    plain = call()
    capture = xattn.Capture("steps=0:1", blocks=ALL_BLOCKS)
    with xattn.hooks(pipe, capture):
        captured = call()
    joint_sites = sum(1 for site in xattn.sites(pipe) if site.kind == "joint")
    assert explicit_steps == [0] * joint_sites  # step 1 ran fused
    assert (captured - plain).abs().max() <= 1e-5  # capturing blocks changes nothing
    assert capture.maps().block("text->image").shape[1] == 8 * 12
    explicit_steps.clear()
    with xattn.hooks(pipe, xattn.Reweight({"circle": 2.0})):
        call()
    assert explicit_steps == []  # value_scale alone: fused

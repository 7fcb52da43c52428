"""Local blend options through edit(), the command line and a model's edit defaults (#17):
the mask's widening (blend_dilate), its window (blend_steps) and the pixel composite (blend_pixels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import tiny_models
from xattn.cli.edit import edit_options
from xattn.edit import EditError, LocalBlend, build_controllers, edit
from xattn.edit.blend import composite
from xattn.edit.defaults import recommended

SOURCE, TARGET = "a red circle and a blue square", "a green circle and a blue square"
FAST = dict(seed=3, steps=3, guidance=5.0)
SECTION = {"blend": "edited-object", "object_words": ["circle", "square"], "threshold": 0.85,
           "inverted": {"blend_dilate": 0, "blend_pixels": 4}}


def blender(controllers) -> LocalBlend:
    return next(c for c in controllers if isinstance(c, LocalBlend))


def test_blend_dilate_and_steps_reach_the_local_blend():
    controllers = build_controllers(tiny_models.tokenizer(), SOURCE, [TARGET], blend=["circle"], blend_dilate=0,
                                    blend_steps="0:0.5")
    assert blender(controllers).dilate == 0
    assert blender(controllers).to_dict()["steps"] == blender([LocalBlend("circle", steps="0:0.5")]).to_dict()["steps"]
    assert blender(build_controllers(tiny_models.tokenizer(), SOURCE, [TARGET], blend=["circle"])).dilate == 1


@pytest.mark.parametrize("options, message", [
    (dict(blend_dilate=-1), "dilate is a whole number"),
    (dict(blend_dilate=1.5), "dilate is a whole number"),
    (dict(blend_steps="0:x"), "not a number"),
])
def test_bad_blend_options_fail_before_sampling(options, message):
    with pytest.raises(EditError, match=message):
        build_controllers(tiny_models.tokenizer(), SOURCE, [TARGET], blend=["circle"], **options)


def reference_composite(source: np.ndarray, target: np.ndarray, mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixel by pixel: a target pixel stays when some pixel of a masked block lies within ``margin`` (Chebyshev)."""
    block_h, block_w = source.shape[0] // mask.shape[0], source.shape[1] // mask.shape[1]
    inside = [(y, x) for y in range(source.shape[0]) for x in range(source.shape[1])
              if mask[y // block_h, x // block_w]]
    out = source.copy()
    for y in range(source.shape[0]):
        for x in range(source.shape[1]):
            if any(max(abs(y - v), abs(x - u)) <= margin for v, u in inside):
                out[y, x] = target[y, x]
    return out


@pytest.mark.parametrize("margin", [0, 1, 3])
def test_composite_takes_the_source_outside_the_mask_and_its_margin(margin):
    import torch

    rng = np.random.default_rng(margin)
    source, target = (rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(2))
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 2] = mask[2, 0] = True  # 4x4 blocks
    made = composite(Image.fromarray(source), Image.fromarray(target), torch.from_numpy(mask), margin)
    assert np.array_equal(np.asarray(made), reference_composite(source, target, mask, margin))
    with pytest.raises(EditError, match="does not tile"):
        composite(Image.fromarray(source), Image.fromarray(target), torch.ones(5, 4, dtype=torch.bool))


def test_blend_pixels_keeps_the_source_image_where_the_blend_kept_the_source_latents(sd1_pipe):
    # Reference: the same edit's latents. Where the target's latent pixel is the source's exactly
    # (the blend kept it), the composited image shows the source image's block; elsewhere the target's.
    options = dict(blend=["circle"], threshold=0.95, blend_dilate=0, reprompt=False, **FAST)
    latents = edit(sd1_pipe, SOURCE, TARGET, output_type="latent", **options)
    plain = edit(sd1_pipe, SOURCE, TARGET, **options)
    made = edit(sd1_pipe, SOURCE, TARGET, blend_pixels=0, **options)
    kept = (latents.targets[0] == latents.source).all(dim=0).numpy()  # [h, w]
    assert 0 < kept.sum() < kept.size
    factor = sd1_pipe.vae_scale_factor
    kept_pixels = kept.repeat(factor, 0).repeat(factor, 1)[..., None]
    expected = np.where(kept_pixels, np.asarray(plain.source), np.asarray(plain.targets[0]))
    assert np.array_equal(np.asarray(made.targets[0]), expected)
    assert np.array_equal(np.asarray(made.source), np.asarray(plain.source))
    assert made.settings["blend_pixels"] == 0 and "blend_pixels" not in plain.settings


def test_bad_blend_pixels_are_refused(sd1_pipe):
    for value in (-1, 2.5, True):
        with pytest.raises(EditError, match="blend_pixels is a whole number"):
            edit(sd1_pipe, SOURCE, TARGET, blend=["circle"], blend_pixels=value, **FAST)
    with pytest.raises(EditError, match="blend_pixels composites decoded images"):
        edit(sd1_pipe, SOURCE, TARGET, blend=["circle"], blend_pixels=4, output_type="latent", **FAST)


# -- a model's edit defaults and the command line ---------------------------------------
def test_the_inverted_settings_replace_the_others_for_inverted_images_only():
    assert recommended(SECTION, SOURCE, [TARGET]) == {"blend": ["circle"], "threshold": 0.85}
    assert recommended(SECTION, SOURCE, [TARGET], inverted=True) == {
        "blend": ["circle"], "threshold": 0.85, "blend_dilate": 0, "blend_pixels": 4}
    with pytest.raises(EditError, match="inverted: unknown key"):
        recommended({**SECTION, "inverted": {"dilate": 0}}, SOURCE, [TARGET])
    with pytest.raises(EditError, match="inverted is a JSON object"):
        recommended({**SECTION, "inverted": 4}, SOURCE, [TARGET])


def test_edit_options_take_flags_over_the_models_inverted_settings():
    prompts = {"source": SOURCE, "target": [TARGET]}
    generated = edit_options(prompts, SECTION)
    assert generated["blend_dilate"] == 1 and generated["blend_pixels"] is None
    inverted = edit_options(prompts, SECTION, inverted=True)
    assert inverted["blend_dilate"] == 0 and inverted["blend_pixels"] == 4 and inverted["blend"] == ["circle"]
    typed = edit_options({**prompts, "blend_dilate": 2, "blend_pixels": "none"}, SECTION, inverted=True)
    assert typed["blend_dilate"] == 2 and typed["blend_pixels"] is None
    assert edit_options({**prompts, "blend_dilate": "2", "blend_pixels": "8"})["blend_pixels"] == 8  # config text


@pytest.mark.parametrize("values, message", [
    ({"blend_dilate": -1}, "--blend-dilate is a whole number"),
    ({"blend_dilate": "wide"}, "--blend-dilate is a whole number"),
    ({"blend_pixels": "-2"}, "--blend-pixels is a whole number"),
    ({"blend_steps": "0:x"}, "--blend-steps: 'x' is not a number"),
    ({"blend_steps": "0.5:0.2"}, "--blend-steps: range"),
    ({"threshold": 1.5}, "--threshold is a fraction"),
])
def test_edit_options_name_the_bad_option(values, message):
    with pytest.raises(EditError, match=message):
        edit_options({"source": SOURCE, "target": [TARGET], **values})


def test_cli_edit_blend_options_reach_the_manifest_and_bad_ones_exit_2(cli, sd1_path, tmp_path):
    result = cli("edit", "--source", SOURCE, "--target", TARGET, "--blend", "circle", "--blend-dilate", 0,
                 "--blend-steps", "0:0.5", "--blend-pixels", 2, "--steps", 2, "--model", sd1_path,
                 "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    blends = [c for c in manifest["edit"]["controllers"] if c.get("edit") == "local_blend"]
    assert len(blends) == 1 and blends[0]["dilate"] == 0 and blends[0]["steps"] == "0.0:0.5"
    assert manifest["edit"]["blend_pixels"] == 2
    for flag, value, message in (("--blend-dilate", -1, "--blend-dilate is a whole number"),
                                 ("--blend-pixels", "some", "--blend-pixels is a whole number"),
                                 ("--blend-steps", "1:0", "--blend-steps")):
        bad = cli("edit", "--source", SOURCE, "--target", TARGET, flag, value, "--model", tmp_path / "nope")
        assert bad.exit_code == 2 and message in bad.output, (flag, bad.output)

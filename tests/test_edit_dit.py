"""prompt-to-prompt on an SD3-style joint transformer (no T5): word swap at the joint sites' image->text block.

References: the stock pipeline's own samples (source and re-prompt), an edit
that replaces nothing (the target's plain sample), and the source's map
written into the target row, checked at the ``probs`` point.
"""
import pytest
import torch

import xattn
from joint_reference import sd3_pipeline
from xattn.edit import EditError, Replace, edit

SOURCE, TARGET = "a red circle", "a blue circle"
FAST = dict(steps=3, guidance=4.0, seed=2, output_type="latent")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return sd3_pipeline(tmp_path_factory.mktemp("sd3_edit") / "pipe")


def plain(pipe, prompt):
    return pipe(prompt, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(2)).images[0]


def test_source_and_reprompt_are_the_stock_samples_and_the_edit_changes_the_target(pipe):
    result = edit(pipe, SOURCE, TARGET, **FAST)
    assert (result.source - plain(pipe, SOURCE)).abs().max() <= 1e-4
    assert (result.reprompts[0] - plain(pipe, TARGET)).abs().max() <= 1e-4
    assert (result.targets[0] - result.reprompts[0]).abs().max() > 1e-3


def test_an_edit_that_replaces_nothing_is_the_plain_target(pipe):
    result = edit(pipe, SOURCE, TARGET, cross_steps="0:0", self_steps=None, reprompt=False, **FAST)
    assert (result.targets[0] - plain(pipe, TARGET)).abs().max() <= 1e-4


def test_the_target_row_gets_the_source_map_on_every_text_column(pipe):
    """With a full window, after Replace the target's image->text block equals the source's (333 columns)."""
    seen = []

    def after(probs, ctx):
        if ctx.step == 0:
            seen.append(probs.detach().clone())

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    with xattn.hooks(pipe, Replace(steps="0:1"), xattn.Hook("probs", after)):
        pipe([SOURCE, TARGET], latents=latent, num_inference_steps=2, guidance_scale=4.0, output_type="latent")
    block = seen[0]  # [uncond src, uncond tgt, cond src, cond tgt] x heads x image x 333 text columns
    assert block.shape[-1] == 77 + 256
    assert torch.allclose(block[3], block[2], atol=1e-6)  # a one-word swap maps every slot to itself
    without = []
    with xattn.hooks(pipe, xattn.Hook("probs", lambda probs, ctx: without.append(probs.clone()) if ctx.step == 0
                                       else None)):
        pipe([SOURCE, TARGET], latents=latent, num_inference_steps=2, guidance_scale=4.0, output_type="latent")
    assert not torch.allclose(without[0][3], without[0][2], atol=1e-6)  # unedited, the two prompts' maps differ


def test_flux_pipelines_other_than_text_to_image_are_refused_by_name():
    """FluxPipeline edits (tests/test_edit_flux.py); its img2img, fill, control and Kontext pipelines add image
    inputs or tokens of their own, which an edit's shared latent does not cover."""
    class FluxImg2ImgPipeline:
        transformer = type("FluxTransformer2DModel", (), {})()

    with pytest.raises(EditError, match="FluxPipeline only; FluxImg2ImgPipeline"):
        edit(FluxImg2ImgPipeline(), SOURCE, TARGET, **FAST)


def test_a_pipeline_without_a_denoiser_is_refused_by_name():
    class TextOnlyPipeline:
        tokenizer = None

    with pytest.raises(EditError, match="UNet or a transformer; TextOnlyPipeline has neither"):
        edit(TextOnlyPipeline(), SOURCE, TARGET, **FAST)


def test_token_maps_must_be_one_per_prompt(pipe):
    from xattn.edit import build_controllers
    from xattn.tokens import TokenMap

    one = [TokenMap(pipe.tokenizer, SOURCE)]
    with pytest.raises(EditError, match="got 1 token maps for 2 prompts"):
        build_controllers(pipe.tokenizer, SOURCE, [TARGET], token_maps=one)

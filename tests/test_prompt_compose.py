"""A1111's AND (composable diffusion): sub-prompts by A1111's rules, runs equal to a hand-written denoising loop."""

from __future__ import annotations

import pytest
import torch

from xattn.capture import Capture
from xattn.prompts import ComposedPrompt, UnsupportedSyntaxError, encode_prompt, split_composition
from xattn.prompts.compose import is_composed
from xattn.prompts.pipeline import SCHEDULE_KEY, call, hook_names, prompt_kwargs
from xattn.tokens import TokenError

# -- parsing: hand-checked against A1111's documented rules ---------------------------------------------

SPLITS = [
    ("a red circle AND a blue square :0.7", [("a red circle", 1.0), (" a blue square", 0.7)]),
    # the wiki's example: weights with or without a space before the colon, default 1
    ("a cat :1.2 AND a dog AND a penguin :2.2", [("a cat", 1.2), (" a dog", 1.0), (" a penguin", 2.2)]),
    ("a cat: -0.5  AND a dog", [("a cat", -0.5), (" a dog", 1.0)]),  # negative weight, spaces around
    ("a cat:+2", [("a cat", 2.0)]),
    ("a cat:.5 AND b:1.", [("a cat", 0.5), (" b", 1.0)]),          # ".5" and "1." are numbers
    ("a cat:1e2", [("a cat:1e2", 1.0)]),                           # no exponent: text
    ("a cat:", [("a cat:", 1.0)]),
    ("a (cat:1.5) AND dog", [("a (cat:1.5)", 1.0), (" dog", 1.0)]),  # emphasis is the sub-prompt's own
    ("a:b:0.5", [("a:b", 0.5)]),                                   # only the last colon is the weight
    ("photo 16:9", [("photo 16", 9.0)]),                           # a trailing weight without AND, as A1111
    ("cats and dogs", [("cats and dogs", 1.0)]),                  # lower-case: text
    ("ANDROID AND ANDY", [("ANDROID", 1.0), (" ANDY", 1.0)]),       # whole words only
    ("a [red AND blue:0.5] c", [("a [red", 1.0), (" blue:0.5] c", 1.0)]),  # split before brackets
    ("a cat   ", [("a cat", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), SPLITS, ids=[case[0] for case in SPLITS])
def test_split_follows_a1111(prompt, expected):
    assert [tuple(part) for part in split_composition(prompt)] == expected


@pytest.mark.parametrize(("prompt", "composed"), [("a cat AND a dog", True), ("a cat:0.5", True),
                                                  ("a (cat:0.5)", False), ("a [b:c:0.5]", False),
                                                  ("cats and dogs", False)])
def test_which_prompts_compose(prompt, composed):
    assert is_composed(prompt) is composed


# -- runs: equal to a hand-written loop -------------------------------------------------------------------

STEPS = 3
SIZE = 32


@pytest.fixture
def pipe64(sd1_pipe):
    """The tiny SD1 pipeline in float64: the comparisons with the hand-written loop then test the composition, not
    float32's batch-size-dependent rounding (about 6e-7 per UNet output, amplified by guidance and the scheduler)."""
    return sd1_pipe.to(torch.float64)


def _reference(pipe, parts: list[tuple[str, float]], guidance: float, negative: str = ""):
    """Scheduler stepped by hand; the UNet once for the negative prompt and once per sub-prompt; float64 sums."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    conds = [encode_prompt(pipe, text, negative).prompt_embeds for text, _ in parts]
    uncond = encode_prompt(pipe, parts[0][0], negative).negative_prompt_embeds
    shape = (1, pipe.unet.config.in_channels, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=pipe.unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = scheduler.scale_model_input(latents, t)
            e_u = pipe.unet(sample, t, encoder_hidden_states=uncond).sample.double()
            combined = e_u.clone()
            for cond, (_, weight) in zip(conds, parts):
                combined += weight * (pipe.unet(sample, t, encoder_hidden_states=cond).sample.double() - e_u)
            eps = e_u + guidance * (combined - e_u) if guidance > 1 else combined
            latents = scheduler.step(eps.to(latents.dtype), t, latents).prev_sample
    return latents


def _composed(pipe, prompt: str, guidance: float = 4.0, *controllers, negative: str = ""):
    composed = ComposedPrompt(pipe, prompt, negative)
    with composed.hooks(*controllers):
        return pipe(**composed.pipeline_kwargs(), num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE,
                    width=SIZE, generator=torch.Generator().manual_seed(3), output_type="latent").images


def _plain(pipe, prompt: str, guidance: float = 4.0):
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


@pytest.mark.parametrize(("prompt", "parts"), [
    ("a red circle AND a blue square :0.7", [("a red circle", 1.0), ("a blue square", 0.7)]),
    ("a red circle :1.3 AND a blue square :-0.4 AND green grass", [("a red circle", 1.3),
                                                                         ("a blue square", -0.4),
                                                                         ("green grass", 1.0)]),
])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_composition_equals_the_hand_written_loop(pipe64, prompt, parts, guidance):
    expected = _reference(pipe64, parts, guidance)
    got = _composed(pipe64, prompt, guidance)
    assert (got - expected).abs().max().item() <= 1e-5
    alone = _reference(pipe64, parts[:1], guidance)
    assert (got - alone).abs().max().item() > 1e-4  # the other sub-prompts change the result


def test_with_a_negative_prompt(pipe64):
    parts = [("a red circle", 1.0), ("a blue square", 0.5)]
    expected = _reference(pipe64, parts, 4.0, negative="blurry")
    got = _composed(pipe64, "a red circle AND a blue square:0.5", 4.0, negative="blurry")
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_one_sub_prompt_is_the_plain_prompt(sd1_pipe, guidance):
    got = _composed(sd1_pipe, "a red circle", guidance)
    assert (got - _plain(sd1_pipe, "a red circle", guidance)).abs().max().item() <= 1e-5


def test_weight_zero_drops_a_sub_prompt(sd1_pipe):
    got = _composed(sd1_pipe, "a red circle AND a blue square:0")
    assert (got - _plain(sd1_pipe, "a red circle")).abs().max().item() <= 1e-5


def test_prompt_editing_inside_a_sub_prompt(sd1_pipe):
    """[red:blue:0.5] in sub-prompt 0 switches that sub-prompt's text, as A1111 schedules each sub-prompt."""
    edited = _composed(sd1_pipe, "a [red:blue:0.5] circle AND a square:0.5")
    red = _composed(sd1_pipe, "a red circle AND a square:0.5")
    assert (edited - red).abs().max().item() > 1e-4


def test_capture_names_the_sub_prompts(sd1_pipe):
    capture = Capture()
    composed = ComposedPrompt(sd1_pipe, "a red circle AND a blue square")
    with composed.hooks(capture):
        sd1_pipe(**composed.pipeline_kwargs(), num_inference_steps=2, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(3))
    maps = capture.maps()
    assert maps.prompts == ["a red circle", " a blue square"]
    assert composed.prompt_of("square") == 1 and composed.prompt_of("circle") == 0
    square, circle = maps.word("square", prompt=1), maps.word("circle", prompt=0)
    assert torch.isfinite(square).all() and torch.isfinite(circle).all()
    with pytest.raises(TokenError, match="'a' is in more than one sub-prompt"):
        composed.prompt_of("a")
    with pytest.raises(TokenError, match="no sub-prompt"):
        composed.prompt_of("triangle")
    with pytest.raises(TokenError):
        maps.word("square", prompt=0)


def test_prompt_kwargs_call_and_hook_names(pipe64):
    sd1_pipe = pipe64
    prompt = "a red circle AND a blue square :0.7"
    kwargs = prompt_kwargs(sd1_pipe, [prompt])
    assert isinstance(kwargs[SCHEDULE_KEY], ComposedPrompt) and "prompt" not in kwargs
    assert hook_names(sd1_pipe, [prompt])["prompts"] == ["a red circle", " a blue square"]
    got = call(sd1_pipe, **kwargs, num_inference_steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    expected = _reference(sd1_pipe, [("a red circle", 1.0), ("a blue square", 0.7)], 4.0)
    assert (got - expected).abs().max().item() <= 1e-5
    with pytest.raises(UnsupportedSyntaxError, match="one prompt per call"):
        prompt_kwargs(sd1_pipe, [prompt, "a dog"])


def test_runner_generate_runs_and(sd1_pipe):
    import numpy as np

    from xattn.app.runner import generate

    def image(prompt):
        kwargs = prompt_kwargs(sd1_pipe, [prompt])
        kwargs.pop("prompt", None)
        return np.asarray(generate(sd1_pipe, [prompt], seed=1, steps=2, guidance=4.0, size=SIZE, **kwargs)[0])

    assert (image("a red circle AND a blue square") != image("a red circle")).any()


def test_cli_generate_with_and(cli, sd1_path):
    result = cli("generate", "a red circle AND a blue square :0.7", "--model", sd1_path, "--steps", 2, "--size", 32,
                 "--out", "run", "--no-progress")
    assert result.exit_code == 0, result.output


def test_two_encoders_without_a_pooled_input_are_refused_by_name():
    # SDXL itself runs (tests/test_prompt_sdxl_runs.py); a UNet without its pooled input cannot
    from types import SimpleNamespace

    unet = SimpleNamespace(config=SimpleNamespace(addition_embed_type=None))
    pipe = SimpleNamespace(unet=unet, text_encoder=object(), text_encoder_2=object(), controlnet=None)
    with pytest.raises(UnsupportedSyntaxError, match="no pooled text vector"):
        ComposedPrompt(pipe, "a cat AND a dog")


def test_and_in_the_negative_prompt_is_refused(sd1_pipe):
    with pytest.raises(UnsupportedSyntaxError, match="negative prompt"):
        ComposedPrompt(sd1_pipe, "a cat AND a dog", "x AND y")


def test_without_its_embeddings_the_call_is_refused(sd1_pipe):
    from xattn.prompts.compose import CompositionError

    composed = ComposedPrompt(sd1_pipe, "a cat AND a dog")
    with composed.hooks(), pytest.raises(CompositionError, match="pipeline_kwargs"):
        sd1_pipe("something else", num_inference_steps=1, height=SIZE, width=SIZE, output_type="latent")

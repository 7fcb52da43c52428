"""Prompt editing, alternation and AND on SDXL: equal to a denoising loop written by hand.

The reference steps the scheduler itself and calls the stock UNet with, at each step, the
hidden states *and* the pooled vector of the text A1111 uses at that step (its SDXL
conditioning per step holds ``crossattn`` and ``vector``). The embeddings come from diffusers'
own ``encode_prompt`` (a text past 75 tokens is written as its chunks, each encoded alone and
concatenated; the pooled vector is the first chunk's); an empty negative prompt is zeros, as
diffusers' ``force_zeros_for_empty_prompt`` and A1111 make it on SDXL. Everything in float64,
so the comparison tests the schedule and the composition, not float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import HeunDiscreteScheduler

import xattn
from xattn.capture import Capture
from xattn.prompts import ComposedPrompt, PromptSchedule, texts_by_step
from xattn.prompts.compose import CompositionError
from xattn.prompts.pipeline import SCHEDULE_KEY, call, prompt_kwargs

STEPS = 4
SIZE = 32
SEED = 3
FILLER = "circle " * 75  # exactly 75 tokens: one whole chunk, no comma to backtrack to


@pytest.fixture
def pipe64(sdxl_pipe):
    return sdxl_pipe.to(torch.float64)


def _encode(pipe, chunks: str | tuple[str, ...]):
    """([1, 77k, d] hidden states, [1, d2] pooled) of a text written as its 75-token chunks, by diffusers."""
    chunks = (chunks,) if isinstance(chunks, str) else chunks
    encoded = [pipe.encode_prompt(chunk, device="cpu", do_classifier_free_guidance=False) for chunk in chunks]
    return torch.cat([hidden for hidden, *_ in encoded], dim=1), encoded[0][2]


def _negative(pipe, negative: str, chunks: int):
    """The unconditional conditioning: zeros for an empty negative prompt, padded with empty-prompt chunks."""
    if negative:
        hidden, pooled = _encode(pipe, negative)
    else:
        assert pipe.config.force_zeros_for_empty_prompt
        hidden, pooled = _encode(pipe, "")
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    blank = _encode(pipe, "")[0]
    return torch.cat([hidden] + [blank] * (chunks - 1), dim=1), pooled


def _reference(pipe, parts, guidance: float, negative: str | list[str] = "", pooled_follows: bool = True,
               steps: int = STEPS):
    """``parts``: [(text of each step, weight)]; A1111's ``u + Σ w_i (c_i − u)``, then guidance.

    ``pooled_follows=False`` keeps each part's pooled vector at its first text (what switching the
    cross-attention text alone would give). A list ``negative`` is the negative prompt's text at each step."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    first = _encode(pipe, parts[0][0][0])[0]
    negatives = negative if isinstance(negative, list) else [negative] * steps
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=pipe.unet.dtype)  # original, crop, target
    shape = (1, pipe.unet.config.in_channels, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=pipe.unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            sample = scheduler.scale_model_input(latents, t)

            def eps(hidden, pooled):
                added = {"text_embeds": pooled, "time_ids": time_ids}
                return pipe.unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample.double()

            e_u = eps(*_negative(pipe, negatives[step], first.shape[1] // 77))
            combined = e_u.clone()
            for texts, weight in parts:
                hidden, pooled = _encode(pipe, texts[step])
                if not pooled_follows:
                    pooled = _encode(pipe, texts[0])[1]
                combined += weight * (eps(hidden, pooled) - e_u)
            noise = e_u + guidance * (combined - e_u) if guidance > 1 else combined
            latents = scheduler.step(noise.to(latents.dtype), t, latents).prev_sample
    return latents


def _options(guidance: float) -> dict:
    return dict(num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(SEED), output_type="latent")


def _scheduled(pipe, prompt: str, guidance: float = 4.0, negative: str | None = None, *controllers):
    schedule = PromptSchedule(pipe, prompt, negative)
    with xattn.hooks(pipe, schedule, *controllers, **schedule.hook_kwargs()):
        return pipe(**schedule.pipeline_kwargs(), **_options(guidance)).images


def _composed(pipe, prompt: str, guidance: float = 4.0, negative: str = "", *controllers):
    composed = ComposedPrompt(pipe, prompt, negative)
    with composed.hooks(*controllers):
        return pipe(**composed.pipeline_kwargs(), **_options(guidance)).images


def _gap(a, b) -> float:
    return (a - b).abs().max().item()


# -- prompt editing and alternation ----------------------------------------------------------------------

EDITS = [
    ("a [red:blue:0.5] circle", ["a red circle"] * 3 + ["a blue circle"]),
    ("a [red|blue] circle", ["a red circle", "a red circle", "a blue circle", "a red circle"]),
    ("a [red square:blue:1] circle", ["a red square circle"] * 2 + ["a blue circle"] * 2),
]


@pytest.mark.parametrize(("prompt", "texts"), EDITS, ids=[case[0] for case in EDITS])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_schedule_equals_the_hand_written_loop(pipe64, prompt, texts, guidance):
    assert texts_by_step(prompt, STEPS) == texts
    got = _scheduled(pipe64, prompt, guidance)
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], guidance)) <= 1e-9
    # the switch matters, and so does switching the pooled vector with the text
    assert _gap(got, _reference(pipe64, [([texts[0]] * STEPS, 1.0)], guidance)) > 1e-4
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], guidance, pooled_follows=False)) > 1e-4


def test_a_second_order_sampler_switches_text_and_pooled_vector_at_every_call(pipe64):
    """Heun: A1111 1.1 reads the schedule at every denoiser call, laid over twice the steps; the reference
    loop's index runs over the scheduler's 2N - 1 timesteps, one call each."""
    pipe64.scheduler = HeunDiscreteScheduler.from_config(pipe64.scheduler.config)
    calls = 2 * STEPS - 1
    texts = texts_by_step("a [red|blue] circle", 2 * STEPS)[:calls]
    got = _scheduled(pipe64, "a [red|blue] circle")
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], 4.0, negative=[""] * calls)) <= 1e-9
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], 4.0, negative=[""] * calls, pooled_follows=False)) > 1e-4


def test_schedule_with_a_negative_prompt(pipe64):
    texts = ["a red circle"] * 3 + ["a blue circle"]
    got = _scheduled(pipe64, "a [red:blue:0.5] circle", 4.0, "blurry")
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], 4.0, negative="blurry")) <= 1e-9


def test_a_schedule_past_75_tokens_pools_the_first_chunk(pipe64):
    """75 tokens, then the edited words in chunk 2: the pooled vector (chunk 1's) stays, the states switch."""
    texts = [(FILLER.strip(), "red square")] * 3 + [(FILLER.strip(), "blue square")]
    got = _scheduled(pipe64, FILLER + "[red:blue:0.5] square")
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], 4.0)) <= 1e-9
    assert _gap(got, _reference(pipe64, [([texts[0]] * STEPS, 1.0)], 4.0)) > 1e-5


def test_a_schedule_in_the_first_chunk_of_a_break_prompt(pipe64):
    texts = [("a red circle", "a square")] * 3 + [("a blue circle", "a square")]
    got = _scheduled(pipe64, "a [red:blue:0.5] circle BREAK a square")
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], 4.0)) <= 1e-9


def test_the_pooled_hook_leaves_with_the_session(sdxl_pipe):
    schedule = PromptSchedule(sdxl_pipe, "a [red:blue:0.5] circle")
    before = dict(sdxl_pipe.unet._forward_pre_hooks)
    with xattn.hooks(sdxl_pipe, schedule, **schedule.hook_kwargs()):
        sdxl_pipe(**schedule.pipeline_kwargs(), **_options(4.0))
    red = PromptSchedule(sdxl_pipe, "a red circle")  # no schedule: the same as the plain embeddings
    plain = sdxl_pipe(**red.pipeline_kwargs(), **_options(4.0)).images  # the stale hook removes itself
    assert dict(sdxl_pipe.unet._forward_pre_hooks).keys() == before.keys()
    again = sdxl_pipe(**red.pipeline_kwargs(), **_options(4.0)).images
    assert torch.equal(plain, again)


def test_capture_on_a_scheduled_sdxl_prompt(sdxl_pipe):
    capture = Capture()
    _scheduled(sdxl_pipe, "a [red:blue:0.5] circle", 4.0, None, capture)
    assert torch.isfinite(capture.maps().word("circle")).all()
    with pytest.raises(xattn.TokenError, match="not in every text"):
        capture.maps().word("red")


# -- AND -----------------------------------------------------------------------------------------------------

COMPOSED = [
    ("a red circle AND a blue square :0.7", [("a red circle", 1.0), ("a blue square", 0.7)]),
    ("a red circle :1.3 AND a blue square :-0.4 AND green grass",
     [("a red circle", 1.3), ("a blue square", -0.4), ("green grass", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "parts"), COMPOSED, ids=["two", "three"])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_composition_equals_the_hand_written_loop(pipe64, prompt, parts, guidance):
    by_step = [([text] * STEPS, weight) for text, weight in parts]
    got = _composed(pipe64, prompt, guidance)
    assert _gap(got, _reference(pipe64, by_step, guidance)) <= 1e-9
    assert _gap(got, _reference(pipe64, by_step[:1], guidance)) > 1e-4  # the other sub-prompts count


def test_composition_with_a_negative_prompt(pipe64):
    parts = [(["a red circle"] * STEPS, 1.0), (["a blue square"] * STEPS, 0.5)]
    got = _composed(pipe64, "a red circle AND a blue square:0.5", 4.0, "blurry")
    assert _gap(got, _reference(pipe64, parts, 4.0, negative="blurry")) <= 1e-9


def test_editing_inside_a_sub_prompt_switches_its_pooled_vector(pipe64):
    parts = [(["a red circle"] * 3 + ["a blue circle"], 1.0), (["a square"] * STEPS, 0.5)]
    got = _composed(pipe64, "a [red:blue:0.5] circle AND a square:0.5")
    assert _gap(got, _reference(pipe64, parts, 4.0)) <= 1e-9
    assert _gap(got, _reference(pipe64, parts, 4.0, pooled_follows=False)) > 1e-4


def test_sub_prompts_past_75_tokens(pipe64):
    parts = [((FILLER.strip(), "red"),) * STEPS, ((FILLER.strip(), "blue"),) * STEPS]
    got = _composed(pipe64, FILLER + "red AND " + FILLER + "blue :0.5")
    assert _gap(got, _reference(pipe64, [(parts[0], 1.0), (parts[1], 0.5)], 4.0)) <= 1e-9


def test_one_sub_prompt_is_the_plain_prompt(sdxl_pipe):
    got = _composed(sdxl_pipe, "a red circle")
    plain = sdxl_pipe("a red circle", **_options(4.0)).images
    assert _gap(got, plain) <= 1e-5


def test_two_images_per_prompt(pipe64):
    composed = ComposedPrompt(pipe64, "a red circle AND a blue square :0.7")
    with composed.hooks():
        got = pipe64(**composed.pipeline_kwargs(), **{**_options(4.0), "num_images_per_prompt": 2}).images
    parts = [(["a red circle"] * STEPS, 1.0), (["a blue square"] * STEPS, 0.7)]
    assert _gap(got[:1], _reference(pipe64, parts, 4.0)) <= 1e-9


def test_capture_names_the_sdxl_sub_prompts(sdxl_pipe):
    capture = Capture()
    _composed(sdxl_pipe, "a red circle AND a blue square", 4.0, "", capture)
    maps = capture.maps()
    assert maps.prompts == ["a red circle", " a blue square"]
    assert torch.isfinite(maps.word("square", prompt=1)).all()


def test_other_pooled_embeddings_are_refused(sdxl_pipe):
    composed = ComposedPrompt(sdxl_pipe, "a red circle AND a blue square")
    kwargs = composed.pipeline_kwargs()
    kwargs["pooled_prompt_embeds"] = kwargs["pooled_prompt_embeds"] + 1
    with composed.hooks(), pytest.raises(CompositionError, match="pooled"):
        sdxl_pipe(**kwargs, **_options(4.0))


# -- the paths the CLI takes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "parts"), [
    ("a [red:blue:0.5] circle", [(["a red circle"] * 3 + ["a blue circle"], 1.0)]),
    ("a red circle AND a blue square :0.7", [(["a red circle"] * STEPS, 1.0), (["a blue square"] * STEPS, 0.7)]),
])
def test_prompt_kwargs_and_call(pipe64, prompt, parts):
    kwargs = prompt_kwargs(pipe64, [prompt])
    assert SCHEDULE_KEY in kwargs and "pooled_prompt_embeds" in kwargs
    got = call(pipe64, **kwargs, **_options(4.0)).images
    assert _gap(got, _reference(pipe64, parts, 4.0)) <= 1e-9


# -- the empty negative prompt of encoded prompts --------------------------------------------------------------


def test_a_weighted_prompt_gets_the_negative_a_plain_one_gets(pipe64):
    """`a (red:1.0) circle` goes through xattn's encoder, `a red circle` through diffusers: the same image, as
    both zero the empty negative prompt (diffusers' force_zeros_for_empty_prompt, A1111 on SDXL)."""
    kwargs = prompt_kwargs(pipe64, ["a (red:1.0) circle"])
    assert "prompt_embeds" in kwargs
    assert _gap(call(pipe64, **kwargs, **_options(4.0)).images, pipe64("a red circle", **_options(4.0)).images) <= 1e-9


def test_a_long_prompts_empty_negative_is_zeros_then_empty_chunks(sdxl_pipe):
    kwargs = prompt_kwargs(sdxl_pipe, [FILLER + "red square"])
    negative, pooled = kwargs["negative_prompt_embeds"], kwargs["negative_pooled_prompt_embeds"]
    assert negative.shape[1] == 154 and not negative[:, :77].any() and not pooled.any()
    assert torch.allclose(negative[:, 77:], _encode(sdxl_pipe, "")[0], atol=1e-6)  # padding: the empty prompt
    written = prompt_kwargs(sdxl_pipe, [FILLER + "red square"], ["blurry"])
    assert torch.allclose(written["negative_pooled_prompt_embeds"], _encode(sdxl_pipe, "blurry")[1], atol=1e-6)


def test_a_scheduled_negative_prompt_switches_its_hidden_states_and_pooled_vector(pipe64):
    texts, negatives = ["a red circle"] * 3 + ["a blue circle"], ["blurry"] * 3 + ["dark"]
    assert texts_by_step("[blurry:dark:0.5]", STEPS) == negatives
    got = _scheduled(pipe64, "a [red:blue:0.5] circle", 4.0, "[blurry:dark:0.5]")
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], 4.0, negative=negatives)) <= 1e-9
    assert _gap(got, _reference(pipe64, [(texts, 1.0)], 4.0, negative="blurry")) > 1e-4

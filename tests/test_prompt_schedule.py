"""A1111's prompt editing and alternation: schedules by A1111's rules, and runs equal to switching embeddings by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import HeunDiscreteScheduler, KDPM2DiscreteScheduler

import xattn
from xattn.capture import Capture
from xattn.prompts import (PromptSchedule, ScheduledPromptError, UnsupportedSyntaxError, encode_prompt, parse_prompt,
                           parse_schedule, texts_by_step)
from xattn.prompts.pipeline import SCHEDULE_KEY, call, hook_names, prompt_kwargs
from xattn.prompts.schedule import ScheduleError
from xattn.tokens import TokenError

# -- the schedule: A1111's docstring examples (10 steps), as data -----------------------------------

A1111_EXAMPLES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", [(5, "a  c"), (10, "a {b|d{ c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]),
    ("[fe|]male", [(step, "female" if step % 2 else "male") for step in range(1, 11)]),
    ("[fe|||]male", [(step, "female" if step % 4 == 1 else "male") for step in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_EXAMPLES, ids=[case[0] for case in A1111_EXAMPLES])
def test_schedules_of_a1111_examples(prompt, expected):
    assert [tuple(entry) for entry in parse_schedule(prompt, 10)] == expected


def test_the_wiki_example_over_100_steps():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert [tuple(entry) for entry in parse_schedule(prompt, 100)] == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def _edit_rule(when: str, steps: int) -> list[str]:
    """Independent restatement for ``[from:to:when]`` alone: "from" or "to" at each 0-based step.

    The boundary is min(steps, int(value)), value = float(when) * steps when written with a '.', else the
    step number. A1111 compares its 0-based step counter with the schedule's entries (step <= until), and
    the entries are the boundary (when >= 1) and the step count.
    """
    value = float(when) * steps if "." in when else float(when)
    edge = min(steps, int(value))
    entries = sorted({steps} | ({edge} if edge >= 1 else set()))
    return ["from" if next(u for u in entries if step <= u) <= edge else "to" for step in range(steps)]


# Hand-checked: (when, steps) -> the text at steps 0, 1, ...
HAND_TABLE = [
    ("0.5", 4, ["from", "from", "from", "to"]),
    ("0.5", 10, ["from"] * 6 + ["to"] * 4),
    ("0.25", 10, ["from"] * 3 + ["to"] * 7),       # int(2.5) = 2: steps 0, 1, 2
    ("3", 10, ["from"] * 4 + ["to"] * 6),
    ("0", 4, ["to"] * 4),
    ("1", 4, ["from", "from", "to", "to"]),
    ("0.1", 5, ["to"] * 5),                         # int(0.5) = 0: no boundary
    ("1.5", 4, ["from"] * 4),                       # a fraction past 1: every step
    ("10", 4, ["from"] * 4),
    ("0.7", 10, ["from"] * 8 + ["to"] * 2),         # 0.7 * 10 = 7.000000000000001 -> 7
]


@pytest.mark.parametrize(("when", "steps", "expected"), HAND_TABLE, ids=[f"{w}-{s}" for w, s, _ in HAND_TABLE])
def test_step_boundaries_follow_the_documented_rule(when, steps, expected):
    assert _edit_rule(when, steps) == expected
    assert texts_by_step(f"[from:to:{when}]", steps) == expected


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("when", ["0.2", "0.5", ".75", "2", "5", "0.99"])
def test_step_boundaries_for_many_step_counts(when, steps):
    assert texts_by_step(f"[from:to:{when}]", steps) == _edit_rule(when, steps)


def test_alternation_by_step():
    # entries at 1..steps; the 0-based step i takes the entry max(i, 1); option (entry - 1) % n
    assert texts_by_step("[red|blue]", 5) == ["red", "red", "blue", "red", "blue"]
    assert texts_by_step("[a|b|c]", 6) == ["a", "a", "b", "c", "a", "b"]


def test_scheduled_prompt_is_not_one_weighted_prompt():
    with pytest.raises(ScheduledPromptError, match="PromptSchedule"):
        parse_prompt("a [red:blue:0.5] circle")


def test_and_stays_refused_with_the_reason():
    with pytest.raises(UnsupportedSyntaxError, match="composable diffusion.*noise prediction"):
        parse_prompt("a cat AND a dog")


# -- runs: equal to switching the pipeline's prompt_embeds by hand -----------------------------------

STEPS = 4


def _reference(pipe, texts: list[str], negative: str = ""):
    """Switch the pipeline's own prompt_embeds between steps with callback_on_step_end."""
    rows = {text: encode_prompt(pipe, text).prompt_embeds for text in set(texts)}
    uncond = encode_prompt(pipe, "", negative).negative_prompt_embeds

    def switch(pipeline, step, timestep, tensors):
        if step + 1 < len(texts):
            tensors["prompt_embeds"] = torch.cat([uncond, rows[texts[step + 1]]])
        return tensors

    return pipe(prompt_embeds=rows[texts[0]], negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="latent",
                callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images


def _scheduled(pipe, prompt: str, *controllers):
    schedule = PromptSchedule(pipe, prompt)
    with xattn.hooks(pipe, schedule, *controllers, **schedule.hook_kwargs()):
        return pipe(**schedule.pipeline_kwargs(), num_inference_steps=STEPS, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images


@pytest.mark.parametrize(("prompt", "texts"), [
    ("a [red:blue:0.5] circle", ["a red circle"] * 3 + ["a blue circle"]),
    ("a [red|blue] circle", ["a red circle", "a red circle", "a blue circle", "a red circle"]),
    ("a [red square:blue:1] circle", ["a red square circle"] * 2 + ["a blue circle"] * 2),
])
def test_schedule_equals_switching_embeddings_by_hand(sd1_pipe, prompt, texts):
    assert texts_by_step(prompt, STEPS) == texts
    expected = _reference(sd1_pipe, texts)
    got = _scheduled(sd1_pipe, prompt)
    assert (got - expected).abs().max().item() <= 1e-5
    constant = _reference(sd1_pipe, [texts[0]] * STEPS)
    assert (got - constant).abs().max().item() > 1e-4  # the switch changes the result (tolerance: 1e-5)


def _reference_per_call(pipe, texts: list[str]):
    """Switch the UNet's text at every denoiser call (a forward pre-hook): A1111's reading on any sampler."""
    rows = {text: encode_prompt(pipe, text).prompt_embeds for text in set(texts)}
    uncond = encode_prompt(pipe, "", "").negative_prompt_embeds
    calls = []

    def before(module, args, kwargs):
        kwargs["encoder_hidden_states"] = torch.cat([uncond, rows[texts[len(calls)]]])
        calls.append(len(calls))
        return args, kwargs

    handle = pipe.unet.register_forward_pre_hook(before, with_kwargs=True)
    try:
        out = pipe(prompt_embeds=rows[texts[0]], negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                   guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="latent").images
    finally:
        handle.remove()
    assert len(calls) == len(texts)
    return out


# second-order samplers: (scheduler, xattn's step of each of the 2N - 1 calls, its step count, a prompt whose
# switch that reading moves). Heun's two calls share a noise level, so a step; KDPM2's second call is at a
# midpoint of its own, so each call is a step, and the schedule over 2N - 1 steps differs from A1111's over 2N
SECOND_ORDER = [(HeunDiscreteScheduler, lambda call: (call + 1) // 2, STEPS, "a [red|blue] circle"),
                (HeunDiscreteScheduler, lambda call: (call + 1) // 2, STEPS, "a [red:blue:3] circle"),
                (KDPM2DiscreteScheduler, lambda call: call, 2 * STEPS - 1, "a [red:blue:0.5] circle")]


@pytest.mark.parametrize(("scheduler", "step_of_call", "steps", "prompt"), SECOND_ORDER,
                         ids=[f"{case[0].__name__}-{case[3]}" for case in SECOND_ORDER])
def test_a_second_order_sampler_reads_the_schedule_at_every_call_over_twice_the_steps(
        sd1_pipe, scheduler, step_of_call, steps, prompt):
    """A1111 1.1 lays the schedule of a second-order sampler (2N - 1 calls for N steps) over 2N steps, one
    entry per call; reading it by xattn's steps instead would switch elsewhere."""
    sd1_pipe.scheduler = scheduler.from_config(sd1_pipe.scheduler.config)
    per_call = texts_by_step(prompt, 2 * STEPS)[:2 * STEPS - 1]
    per_step = texts_by_step(prompt, steps)
    by_step = [per_step[step_of_call(call)] for call in range(2 * STEPS - 1)]
    assert per_call != by_step  # the two readings differ here, so the test tells them apart
    got = _scheduled(sd1_pipe, prompt)
    assert (got - _reference_per_call(sd1_pipe, per_call)).abs().max().item() <= 1e-5
    assert (got - _reference_per_call(sd1_pipe, by_step)).abs().max().item() > 1e-4


def test_a_second_order_sampler_that_hides_its_call_is_refused_by_name(sd1_pipe, monkeypatch):
    sd1_pipe.scheduler = HeunDiscreteScheduler.from_config(sd1_pipe.scheduler.config)
    monkeypatch.setattr(sd1_pipe.scheduler, "scale_model_input", lambda sample, timestep: sample)
    with pytest.raises(ScheduleError, match="step_index is unset"):
        _scheduled(sd1_pipe, "a [red|blue] circle")


def test_guidance_passes_see_the_text_of_their_step(sd1_pipe):
    """A Guide's gradient pass conditions on the step's text of the schedule, as the step's own call does:
    the same latents as the pipeline's own prompt_embeds switched by hand under the same Guide."""
    from xattn.guide import Excite, Guide

    texts = texts_by_step("a [red:blue:0.5] circle", STEPS)

    def guide():
        return Guide(Excite(["circle"]), steps=1.0, step_size=50.0)

    rows = {text: encode_prompt(sd1_pipe, text).prompt_embeds for text in set(texts)}
    uncond = encode_prompt(sd1_pipe, "", "").negative_prompt_embeds

    def switch(pipeline, step, timestep, tensors):
        if step + 1 < len(texts):
            tensors["prompt_embeds"] = torch.cat([uncond, rows[texts[step + 1]]])
        return tensors

    # the switched embeddings match no encoding the pipeline made: name the rows (circle sits at one slot in both)
    layout = xattn.BatchLayout(rows=(xattn.Row(False, 0, 0), xattn.Row(True, 0, 0)), prompts=("a red circle",),
                               token_maps=(xattn.TokenMap(sd1_pipe.tokenizer, "a red circle"),))
    with xattn.hooks(sd1_pipe, guide(), layout=layout):
        expected = sd1_pipe(prompt_embeds=rows[texts[0]], negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                            guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="latent",
                            callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    got = _scheduled(sd1_pipe, "a [red:blue:0.5] circle", guide())
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - _scheduled(sd1_pipe, "a [red:blue:0.5] circle")).abs().max().item() > 1e-4  # the guide acts


def test_capture_finds_words_every_text_has_and_refuses_the_others(sd1_pipe):
    capture = Capture()
    _scheduled(sd1_pipe, "a [red:blue:0.5] circle", capture)
    assert torch.isfinite(capture.maps().word("circle")).all()
    with pytest.raises(TokenError, match="not in every text.*'a blue circle'"):
        capture.maps().word("red")


def test_prompt_kwargs_and_runner_run_the_schedule(sd1_pipe):
    prompt = "a [red:blue:0.5] circle"
    kwargs = prompt_kwargs(sd1_pipe, [prompt])
    assert isinstance(kwargs[SCHEDULE_KEY], PromptSchedule)
    assert isinstance(hook_names(sd1_pipe, [prompt])["tokenizer"], xattn.prompts.ScheduleTokenizer)
    got = call(sd1_pipe, **kwargs, num_inference_steps=STEPS, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    expected = _reference(sd1_pipe, ["a red circle"] * 3 + ["a blue circle"])
    assert (got - expected).abs().max().item() <= 1e-5


def test_runner_generate_runs_a_scheduled_prompt(sd1_pipe):
    from xattn.app.runner import generate

    def images(prompt):
        kwargs = prompt_kwargs(sd1_pipe, [prompt])
        kwargs.pop("prompt", None)  # as the CLI's Run.generate does
        return generate(sd1_pipe, [prompt], seed=1, steps=STEPS, guidance=4.0, **kwargs)[0]

    import numpy as np

    edited, red = np.asarray(images("a [red:blue:0.5] circle")), np.asarray(images("a red circle"))
    assert (edited != red).any()


def _reference_both(pipe, texts: list[str], negatives: list[str]):
    """Switch the text and the negative prompt's rows between steps by hand (A1111 schedules both)."""
    rows = {text: encode_prompt(pipe, text).prompt_embeds for text in set(texts)}
    uncond = {text: encode_prompt(pipe, "", text).negative_prompt_embeds for text in set(negatives)}

    def switch(pipeline, step, timestep, tensors):
        if step + 1 < len(texts):
            tensors["prompt_embeds"] = torch.cat([uncond[negatives[step + 1]], rows[texts[step + 1]]])
        return tensors

    return pipe(prompt_embeds=rows[texts[0]], negative_prompt_embeds=uncond[negatives[0]],
                num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                output_type="latent", callback_on_step_end=switch,
                callback_on_step_end_tensor_inputs=["prompt_embeds"]).images


@pytest.mark.parametrize(("prompt", "negative"), [
    ("a [red:blue:0.5] circle", "[blurry|dark]"),
    ("a red circle", "[:a blue square:0.5]"),  # only the negative prompt is scheduled
])
def test_a_scheduled_negative_prompt_equals_switching_both_by_hand(sd1_pipe, prompt, negative):
    texts, negatives = texts_by_step(prompt, STEPS), texts_by_step(negative, STEPS)
    kwargs = prompt_kwargs(sd1_pipe, [prompt], [negative])
    assert isinstance(kwargs[SCHEDULE_KEY], PromptSchedule)
    got = call(sd1_pipe, **kwargs, num_inference_steps=STEPS, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert (got - _reference_both(sd1_pipe, texts, negatives)).abs().max().item() <= 1e-5
    fixed = _reference_both(sd1_pipe, texts, [negatives[0]] * STEPS)
    assert (got - fixed).abs().max().item() > 1e-4  # the negative's switch changes the result


def test_a_negative_prompt_whose_texts_fill_other_chunk_counts_is_refused(sd1_pipe):
    with pytest.raises(UnsupportedSyntaxError, match="negative prompt fill different numbers"):
        PromptSchedule(sd1_pipe, "a [red:blue:0.5] circle", "[a:" + "b " * 80 + ":0.5]")


def _two_encoders_without_pooled_input():
    """A two-encoder pipeline whose UNet takes no pooled vector: xattn could not switch it as A1111 does."""
    from types import SimpleNamespace

    unet = SimpleNamespace(config=SimpleNamespace(addition_embed_type=None))
    return SimpleNamespace(unet=unet, text_encoder=object(), text_encoder_2=object())


def test_two_encoders_without_a_pooled_input_are_refused_by_name():
    # SDXL itself runs (tests/test_prompt_sdxl_runs.py)
    with pytest.raises(UnsupportedSyntaxError, match="no pooled text vector"):
        PromptSchedule(_two_encoders_without_pooled_input(), "a [red:blue:0.5] circle")


def test_the_words_of_a_scheduled_prompt_are_those_every_text_has(cli, sd1_path, tmp_path):
    """`xattn maps` draws the words found at every step (``circle``), not the ones that change (``red``/``blue``)."""
    import json

    result = cli("maps", "a [red:blue:0.5] circle", "--model", sd1_path, "--steps", 2, "--size", 32, "--out", "run",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    shown = json.loads((tmp_path / "run" / "manifest.json").read_text())["maps"]["shown_words"]
    assert "circle" in shown and "red" not in shown and "blue" not in shown

"""``Capture(uncond=True)`` under Flux's true CFG (a negative prompt and ``true_cfg_scale > 1``).

The transformer runs twice a step: on the prompts' rows, then on the negative
prompts' rows. The capture keeps the second call's rows with the first's, in
the same sums and with the same call counts, so its word maps read them as
the unconditional rows of a pipeline that batches both (``cond=False``; words
resolve through the prompt's token map and the prompt's kept slots, as on SD).
References come from ``probs`` hooks on the same calls, written with the
tokenizer's own slots, and from a plain call with the negative prompt as the
prompt (identical transformer inputs at step 0).
"""

from __future__ import annotations

import pytest
import torch

import xattn
from tiny_flux import load_flux_pipeline, save_flux_pipeline
from xattn.capture.plan import CaptureBudgetError

PROMPT = "a red circle"
NEGATIVE = "a blue square"
T5_LENGTH = 16
STEPS = 3
GRID = (8, 12)  # 16 x 24 image, no VAE scaling, patch size 1
TRUE_CFG = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_flux_pipeline(save_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", t5_length=T5_LENGTH))


def call(pipe, prompt=PROMPT, **options):
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=STEPS, guidance_scale=3.5, height=16, width=24,
                    max_sequence_length=T5_LENGTH, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **options).images


def ids(pipe, text):
    return pipe.tokenizer_2(text, padding="max_length", max_length=T5_LENGTH).input_ids


def slot(pipe, text, word):
    return ids(pipe, text).index(pipe.tokenizer_2.convert_tokens_to_ids("\u2581" + word))


def end_slot(pipe, texts):
    """The last slot a capture keeps by default: the longest prompt's ``</s>`` (the tokenizer's ids)."""
    return max(ids(pipe, text).index(pipe.tokenizer_2.eos_token_id) for text in texts)


class Recorder:
    """A ``probs`` hook at the joint sites keeping each row's heads-averaged image->text map, by call."""

    def __init__(self):
        self.seen = []  # (step, site, Row, [i, j] float64)
        self.hook = xattn.Hook("probs", self.keep, "kind=joint")

    def keep(self, p, ctx):
        for r, row in enumerate(ctx.layout.rows):
            self.seen.append((ctx.step, ctx.site.name, row, p[r].double().mean(0)))

    def mean(self, row, steps=None):
        kept = [m for step, _, each, m in self.seen if each == row and (steps is None or step in steps)]
        return sum(kept) / len(kept), len(kept)


def kept_columns(maps: torch.Tensor, end: int) -> torch.Tensor:
    """``[i, j]`` -> the default capture's columns: slots ``0..end``, then the padding after them summed."""
    return torch.cat([maps[:, : end + 1], maps[:, end + 1:].sum(-1, keepdim=True)], dim=-1)


def test_the_negative_prompts_maps_equal_the_second_calls_probs(pipe):
    recorder = Recorder()
    capture = xattn.Capture(uncond=True)
    with xattn.hooks(pipe, capture, recorder.hook):
        call(pipe, **TRUE_CFG)
    negative, calls = recorder.mean(xattn.Row(False, 0, 0))
    assert calls == 2 * STEPS  # two joint sites a step, the negative prompt's call of each step
    maps = capture.maps()
    assert set(maps.rows) == {xattn.Row(True, 0, 0), xattn.Row(False, 0, 0)}
    assert maps.steps == list(range(STEPS)) and maps.resolutions == [GRID]
    end = end_slot(pipe, [PROMPT])
    assert maps.columns == list(range(end + 1)) and maps.others
    block = maps.block("image->text", cond=False).double()
    assert (block - kept_columns(negative, end)).abs().max() <= 1e-6
    # words: a slot of the negative prompt's text, and (as on SD's unconditional rows) the prompt's words
    square = slot(pipe, NEGATIVE, "square")
    got = maps.word(square, cond=False, normalize=False, size=GRID).double()
    assert (got - negative[:, square].view(GRID)).abs().max() <= 1e-6
    circle = slot(pipe, PROMPT, "circle")
    got = maps.word("circle", cond=False, normalize=False, size=GRID).double()
    assert (got - negative[:, circle].view(GRID)).abs().max() <= 1e-6
    conditional, _ = recorder.mean(xattn.Row(True, 0, 0))
    assert (conditional - negative).abs().max() > 1e-6  # the two rows' maps do differ


@pytest.mark.parametrize("options", [{}, {"keep_heads": True, "blocks": ("text->text", "image->image")},
                                     {"per_step": True, "blocks": ("text->image",)}],
                         ids=["default", "heads-and-blocks", "per-step-block"])
def test_the_first_steps_negative_maps_equal_a_plain_call_of_the_negative_prompt(pipe, options):
    """At step 0 the negative prompt's call sees the plain call's inputs: same latents, same text."""
    true_cfg = xattn.Capture("kind=joint steps=0:1", uncond=True, **options)
    with xattn.hooks(pipe, true_cfg):
        call(pipe, **TRUE_CFG)
    plain = xattn.Capture("kind=joint steps=0:1", **options)
    with xattn.hooks(pipe, plain):
        call(pipe, prompt=NEGATIVE)
    ours, theirs = true_cfg.maps(), plain.maps()
    assert ours.steps == theirs.steps == [0] and ours.columns == theirs.columns  # same token counts
    for block in true_cfg.blocks:
        assert (ours.block(block, cond=False) - theirs.block(block)).abs().max() <= 1e-6, block
    if options.get("keep_heads"):
        assert (ours.block("image->text", heads=[1], cond=False) - theirs.block("image->text", heads=[1])
                ).abs().max() <= 1e-6
    square = slot(pipe, NEGATIVE, "square")
    assert (ours.word(square, cond=False) - theirs.word("square")).abs().max() <= 1e-5


def test_the_conditional_maps_equal_a_capture_of_the_prompts_rows_alone(pipe):
    both, cond_only = xattn.Capture(uncond=True), xattn.Capture()
    both_steps, cond_steps = xattn.Capture(uncond=True, per_step=True), xattn.Capture(per_step=True)
    with xattn.hooks(pipe, both, cond_only, both_steps, cond_steps):
        call(pipe, **TRUE_CFG)
    for ours, theirs in ((both.maps(), cond_only.maps()), (both_steps.maps(), cond_steps.maps())):
        assert torch.equal(ours.block("image->text"), theirs.block("image->text"))
        assert torch.equal(ours.word("circle"), theirs.word("circle"))
        assert ours.token_totals() == theirs.token_totals()
    for step in range(STEPS):
        assert torch.equal(both_steps.maps().word("circle", steps=[step]),
                           cond_steps.maps().word("circle", steps=[step]))
    assert both.calls == cond_only.calls  # one attention call per site and step, as a batched pipeline counts


def test_per_step_and_streamed_negative_maps(pipe, tmp_path):
    recorder = Recorder()
    in_memory = xattn.Capture(uncond=True, per_step=True)
    streamed = xattn.Capture(uncond=True, per_step=True, stream_to=tmp_path / "maps")
    with xattn.hooks(pipe, in_memory, streamed, recorder.hook):
        call(pipe, **TRUE_CFG)
    end = end_slot(pipe, [PROMPT])
    for maps in (in_memory.maps(), streamed.maps()):
        assert maps.per_step and maps.steps == list(range(STEPS))
        for step in range(STEPS):
            for cond in (True, False):
                expected, _ = recorder.mean(xattn.Row(cond, 0, 0), steps={step})
                got = maps.block("image->text", steps=[step], cond=cond).double()
                assert (got - kept_columns(expected, end)).abs().max() <= 1e-3  # stored in fp16
    assert len(list((tmp_path / "maps").iterdir())) == STEPS


def test_several_prompts_and_images_each_row_in_its_place(pipe):
    prompts, negatives = ["a red circle", "a blue square"], ["a green triangle", "a big dog"]
    recorder = Recorder()
    capture = xattn.Capture(uncond=True)
    with xattn.hooks(pipe, capture, recorder.hook):
        call(pipe, prompt=prompts, negative_prompt=negatives, true_cfg_scale=2.0, num_images_per_prompt=2)
    maps = capture.maps()
    end = end_slot(pipe, prompts)
    rows = [xattn.Row(cond, p, i) for cond in (True, False) for p in range(2) for i in range(2)]
    assert sorted(maps.rows, key=rows.index) == rows
    for row in rows:
        expected, calls = recorder.mean(row)
        assert calls == 2 * STEPS
        got = maps.block("image->text", row.prompt, row.image, cond=row.cond).double()
        assert (got - kept_columns(expected, end)).abs().max() <= 1e-6, row


def test_no_hooks_and_a_capture_leave_the_image_as_stock(pipe):
    stock = call(pipe, **TRUE_CFG)
    with xattn.hooks(pipe):
        assert (call(pipe, **TRUE_CFG) - stock).abs().max() <= 1e-5
    with xattn.hooks(pipe, xattn.Capture(uncond=True)):
        assert (call(pipe, **TRUE_CFG) - stock).abs().max() <= 1e-5


def test_memory_is_the_aggregated_sums_of_both_rows_and_nothing_per_call(pipe):
    both, cond_only = xattn.Capture(uncond=True), xattn.Capture()
    both_steps, cond_steps = xattn.Capture(uncond=True, per_step=True), xattn.Capture(per_step=True)
    with xattn.hooks(pipe, both, cond_only, both_steps, cond_steps):
        call(pipe, **TRUE_CFG)
    for ours, theirs in ((both, cond_only), (both_steps, cond_steps)):
        assert ours.bytes_held() == 2 * theirs.bytes_held() == ours.planned_bytes  # two rows where one was kept
        ours_layers, their_layers = ours.maps().layers, theirs.maps().layers
        assert len(ours_layers) == len(their_layers)  # the same sums, not one per call
        for mine, other in zip(ours_layers, their_layers):
            assert mine.tensor().shape == (2, *other.tensor().shape[1:]) and mine.count == other.count
    assert len(both_steps.maps().layers) == STEPS * 2  # per step and joint site
    assert len(both.maps().layers) == 1  # one running sum: one resolution


def test_the_budget_counts_both_rows_before_the_negative_rows_are_stored(pipe):
    one_row = xattn.Capture()
    with xattn.hooks(pipe, one_row):
        call(pipe, **TRUE_CFG)
    held = one_row.bytes_held()
    tight = xattn.Capture(uncond=True, budget=held)  # enough for the prompt's call alone
    with xattn.hooks(pipe, tight), pytest.raises(CaptureBudgetError, match="2 row"):
        call(pipe, **TRUE_CFG)
    assert tight.bytes_held() == 0
    enough = xattn.Capture(uncond=True, budget=2 * held)
    with xattn.hooks(pipe, enough):
        call(pipe, **TRUE_CFG)
    assert enough.bytes_held() == 2 * held


def test_without_uncond_the_negative_prompts_call_stays_out(pipe):
    capture = xattn.Capture()
    with xattn.hooks(pipe, capture):
        call(pipe, **TRUE_CFG)
    maps = capture.maps()
    assert maps.rows == (xattn.Row(True, 0, 0),)
    with pytest.raises(LookupError, match="uncond=True"):
        maps.word("circle", cond=False)


def test_guidance_distilled_flux_without_a_negative_keeps_its_one_row(pipe):
    capture = xattn.Capture(uncond=True)
    with xattn.hooks(pipe, capture):
        call(pipe)
    assert capture.maps().rows == (xattn.Row(True, 0, 0),)

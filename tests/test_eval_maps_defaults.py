"""Word-map defaults on ground truth, and what a capture holds (docs/maps.md; scripts/eval_maps.py is the full run).

The defaults (no mid block, bicubic upsampling) must beat the old ones (every
site, bilinear) on the shapes world's object masks, and a default capture must
hold at most a tenth of what a capture of all 77 token slots held before (a
sum and a scratch per group), and of DAAM's running sums, for the evaluation's prompts: the bytes are counted here from the
tensor shapes the model's attention calls have, not from the capture.
"""

from __future__ import annotations

import pytest
import torch

import xattn
from xattn import world
from xattn.capture import Capture

try:
    from xattn.world.measure import maps as scoring
except ImportError:  # before the world's measurement moved
    from xattn import eval as scoring

GUIDANCE, STEPS = 5.0, 25  # the evaluation's protocol
CAPTIONS, SEEDS = 4, (0, 1)  # a small slice of it: 4 of its 12 captions, 2 of its 4 seeds
OLD = {"exclude": None, "upsample": "bilinear"}


class AtMean:
    """Word maps as the world scoring reads them, the scaled map replaced by ``map > its mean``."""

    def __init__(self, maps, options):
        self.maps, self.options = maps, options
        self.prompts, self.images_per_prompt = maps.prompts, maps.images_per_prompt

    def word(self, key, prompt=0, image=0, *, size=None, normalize=True):
        heat = self.maps.word(key, prompt, image, size=size, normalize=normalize, **self.options)
        return (heat > heat.mean()).float() if normalize else heat


@pytest.fixture(scope="module")
def captured(world_pipe):
    _, pairs = world.heldout_prompts(n_pair=CAPTIONS)
    capture = Capture()
    with xattn.hooks(world_pipe, capture):
        output = world_pipe(pairs, num_images_per_prompt=len(SEEDS), num_inference_steps=STEPS,
                            guidance_scale=GUIDANCE, output_type="np",
                            generator=[torch.Generator().manual_seed(s) for _ in pairs for s in SEEDS])
    images = [(image.clip(0, 1) * 255).round().astype("uint8") for image in output.images]
    return capture.maps(), images


def iou_at_mean(maps, images, options) -> float:
    result = scoring.score_world_images(AtMean(maps, options), images, thresholds=(0.5,))
    return scoring.summarize(result.scores, thresholds=(0.5,)).best_iou


@pytest.mark.slow
def test_default_word_maps_beat_the_old_ones_on_ground_truth(captured):
    maps, images = captured
    new, old = iou_at_mean(maps, images, {}), iou_at_mean(maps, images, OLD)
    print(f"\nIoU of map > mean with the object: new defaults {new:.3f}, old {old:.3f}")
    assert new >= old + 0.03
    # ... and they keep the words on their own objects.
    sweep = scoring.score_world_images(maps, images)
    assert scoring.summarize(sweep.scores).win_rate >= 0.95


def attention_calls(pipe, prompt: str) -> dict[str, tuple[int, int]]:
    """(query positions, heads) of every cross-attention module, read from its inputs by a forward hook."""
    seen = {}
    handles = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            def keep(module, args, kwargs, name=name):
                seen[name] = (args[0].shape[1] if args else kwargs["hidden_states"].shape[1], module.heads)
            handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=GUIDANCE, output_type="np")
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.slow
def test_a_capture_holds_a_tenth_of_the_old_capture_and_of_daam(world_pipe):
    _, pairs = world.heldout_prompts(n_pair=12)
    calls = attention_calls(world_pipe, pairs[0])
    # Aggregated capture: one float32 running sum and one scratch per (size, mid block or not), one row (one image).
    groups = {(queries, name.startswith("mid_block")) for name, (queries, _) in calls.items()}
    # The capture before docs/maps.md: all 77 slots, a running sum and a head-sum scratch per group (207 kB).
    before = sum(2 * queries * 77 * 4 for queries, _ in groups)
    # DAAM 0.2: a float32 [77, h, w] sum per layer and head, mid block left out (710 kB).
    daam = sum(heads * 77 * queries * 4 for name, (queries, heads) in calls.items() if not name.startswith("mid_block"))
    for caption in pairs:
        kept = len(world_pipe.tokenizer.tokenize(caption)) + 2 + 1  # start, pieces, end; then the padding summed
        expected = sum(queries * kept * 4 for queries, _ in groups)  # one float32 running sum per group
        every_slot = sum(queries * 77 * 4 for queries, _ in groups)
        held = {}
        for steps in (2, 5):
            default, full = Capture(), Capture(slots="all")
            with xattn.hooks(world_pipe, default, full):
                world_pipe(caption, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np")
            assert (default.bytes_held(), full.bytes_held()) == (expected, every_slot), caption
            held[steps] = default.bytes_held()
        assert held[2] == held[5]  # independent of the number of steps
        assert 10 * expected <= before and 10 * expected <= daam, (caption, expected, before, daam)

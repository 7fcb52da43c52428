"""A small, fixed-seed evaluation of the shipped model against ground truth.

Thresholds sit a little under the full evaluation figures in the model card
(scripts/eval_world.py), so a regression in the model, the world, the
tokenizer alignment or the guidance batch order makes this fail.
"""
import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from xattn.world import heldout_prompts, model_path  # noqa: E402
from xattn.world.evaluate import generation_scores, localisation_scores, reweight_curve  # noqa: E402

# Full evaluation (model card): win rate 0.992, IoU own 0.722 vs other 0.007,
# colour 0.958, shape 0.927, both colours 0.984, weight-0 colour pixels 0.457.
# This small run measured 1.000, 0.756 vs 0.001, 0.944, 1.000, 1.000, 0.197.
WIN_MIN = 0.95
IOU_MIN = 0.60
COLOR_MIN = 0.85
SHAPE_MIN = 0.85
BOTH_MIN = 0.85
ZERO_MAX = 0.50  # zeroing a colour word keeps at most half its pixels


@pytest.fixture(scope="module")
def pipe(world_pipe):
    return world_pipe


@pytest.fixture(scope="module")
def defaults():
    import json
    return json.loads((model_path() / "xattn_defaults.json").read_text())


def test_localisation_on_heldout_scenes(pipe):
    loc = localisation_scores(pipe, n=8)
    assert loc.win_rate >= WIN_MIN
    assert loc.iou_own >= IOU_MIN
    assert loc.iou_own >= 5 * loc.iou_other


@pytest.mark.slow
def test_generation_on_heldout_prompts(pipe, defaults):
    singles, pairs = heldout_prompts(n_pair=4)
    g, steps = defaults["guidance_scale"], defaults["num_inference_steps"]
    s = generation_scores(pipe, list(range(6)), g, steps, singles=singles, pairs=[])
    p = generation_scores(pipe, list(range(3)), g, steps, singles=[], pairs=pairs)
    assert s.color_acc >= COLOR_MIN
    assert s.shape_acc >= SHAPE_MIN
    assert p.both_colors >= BOTH_MIN


@pytest.mark.slow
def test_zeroing_a_colour_word_removes_its_colour(pipe, defaults):
    _, pairs = heldout_prompts(n_pair=2)
    curve = reweight_curve(pipe, pairs, [0, 1, 2], defaults["guidance_scale"],
                           defaults["num_inference_steps"], weights=(0.0, 1.0))
    assert curve[0.0] <= ZERO_MAX

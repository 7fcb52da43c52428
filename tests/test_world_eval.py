"""A small, fixed-seed evaluation of the shipped model against ground truth.

Thresholds sit a little under the full evaluation figures in the model card
(scripts/eval_world.py), so a regression in the model, the world, the
tokenizer alignment or the guidance batch order makes this fail.
"""
import pytest

from xattn.world import heldout_prompts
from xattn.world.measure import generation_scores, localisation_scores, reweight_curve

# Full evaluation (model card): win rate 0.992, IoU own 0.722 vs other 0.007,
# colour 0.958, shape 0.927, both colours 0.984, weight-0 colour pixels 0.457.
# This small run measured 1.000, 0.756 vs 0.001, 0.944, 1.000, 1.000, 0.197.
WIN_MIN = 0.95
IOU_MIN = 0.60
COLOR_MIN = 0.85
SHAPE_MIN = 0.85
BOTH_MIN = 0.85
ZERO_MAX = 0.50  # zeroing a colour word keeps at most half its pixels


def test_localisation_on_heldout_scenes(world_pipe):
    loc = localisation_scores(world_pipe, n=8)
    assert loc.win_rate >= WIN_MIN
    assert loc.iou_own >= IOU_MIN
    assert loc.iou_own >= 5 * loc.iou_other


@pytest.mark.slow
def test_generation_on_heldout_prompts(world_pipe, world_defaults):
    singles, pairs = heldout_prompts(n_pair=4)
    g, steps = world_defaults["guidance_scale"], world_defaults["num_inference_steps"]
    s = generation_scores(world_pipe, list(range(6)), g, steps, singles=singles, pairs=[])
    p = generation_scores(world_pipe, list(range(3)), g, steps, singles=[], pairs=pairs)
    assert s.color_acc >= COLOR_MIN
    assert s.shape_acc >= SHAPE_MIN
    assert p.both_colors >= BOTH_MIN


@pytest.mark.slow
def test_zeroing_a_colour_word_removes_its_colour(world_pipe, world_defaults):
    _, pairs = heldout_prompts(n_pair=2)
    curve = reweight_curve(world_pipe, pairs, [0, 1, 2], world_defaults["guidance_scale"],
                           world_defaults["num_inference_steps"], weights=(0.0, 1.0))
    assert curve[0.0] <= ZERO_MAX

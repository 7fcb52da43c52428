"""Shapes world: colour and shape word maps land on their own objects (a small, fast version of scripts/eval_maps.py).

Needs the embedded model (src/xattn/world/model/); without it these tests fail
with the loader's message rather than skip, so a missing model is never hidden.
"""

from __future__ import annotations

import pytest

from xattn import world
from xattn.world import measure as scoring

WIN_RATE = 0.95  # the bar: own object beats the other in >= 95% of words
MEAN_IOU = 0.40  # ... and mean IoU >= 0.40 at the best threshold
PAIRS = 6  # held-out two-object captions in the fast version
IMAGES = 2  # images per caption
MIN_SCORED_IMAGES = 4  # images where both named objects were drawn (generation quality is not scored here)
SEED = 1234


@pytest.fixture(scope="module")
def world_result(world_pipe, world_settings):
    _, pairs = world.heldout_prompts(n_pair=PAIRS)
    return scoring.score_world(world_pipe, pairs, seed=SEED, images_per_prompt=IMAGES, **world_settings)


@pytest.mark.slow
def test_word_maps_put_more_mass_on_their_own_object(world_result):
    print("\n" + scoring.format_table(world_result.summaries()))
    colour, shape, overall = world_result.summaries()
    assert colour.contests >= 2 * MIN_SCORED_IMAGES, world_result.skipped  # enough images to score
    assert colour.win_rate >= WIN_RATE and shape.win_rate >= WIN_RATE, scoring.format_table([colour, shape])


@pytest.mark.slow
def test_word_maps_overlap_their_own_object(world_result):
    colour, shape, overall = world_result.summaries()
    assert colour.best_iou >= MEAN_IOU and shape.best_iou >= MEAN_IOU, scoring.format_table([colour, shape])

"""Prompt-to-prompt on the shapes-world model: edits keep the layout, plain re-prompts do not.

Effect tests of the issue, read with the world's rule-based colour segmenter
(no learned judge, :mod:`xattn.world.measure`), over 16 seeds and two prompt
pairs. Colour swaps are checked plain and as prompt-to-prompt's attribute
edit (with local blending on the edited object's word), which the 90% bar
is asked of. They need the shipped model in ``src/xattn/world/model/``. Run with
``pytest -s`` to print the figures; ``scripts/eval_edits.py`` measures the
same over more seeds and pairs.

Only training combinations of colour and shape are used (the held-out ones,
e.g. "green circle", test composition, not editing).
"""

from __future__ import annotations

import numpy as np
import pytest

from xattn.edit import edit_seeds
from xattn.world.measure import (MASK_IOU, POSITION_PX, as_rgb, blob, colour_swap, colour_swap_summary, object_words,
                                 shape_swap)

pytestmark = pytest.mark.slow

SEEDS = list(range(16))
KEEP_RATE = 0.9  # the bar for edits
CLEAR_GAP = 0.25  # re-prompting must keep the mask at least this much less often
# The untouched object counts as unchanged when its pixels moved by at most OTHER_MEAN levels (of 255) on
# average and OTHER_P95 at the 95th percentile. Not zero: LocalBlend restores the source's *latents*
# outside the mask exactly, but the VAE decoder's mid-block self-attention lets every decoded pixel see
# the edited region, so a few levels leak everywhere (prompt-to-prompt has the same property).
OTHER_MEAN = 10
OTHER_P95 = 32

# (source, target, edited colour before, after, the other object's colour)
COLOR_SWAPS = [
    ("a red circle and a blue triangle", "a yellow circle and a blue triangle", "red", "yellow", "blue"),
    ("a green square and a yellow circle", "a red square and a yellow circle", "green", "red", "yellow"),
]
# prompt-to-prompt's attribute edit: local blending on the edited object's word. The threshold was chosen on
# seeds 100-131 (0.3 / 0.6 / 0.75 / 0.85 / 0.9 kept 0.80 / 0.88 / 0.91 / 0.97 / 0.96, and 0.9 once left the old
# colour); these tests and scripts/eval_edits.py use other seeds.
BLEND_THRESHOLD = 0.85

SHAPE_SWAP = ("a red circle and a blue triangle", "a red square and a blue triangle", "red", "square")


@pytest.fixture(scope="module")
def world(world_pipe, world_settings):
    def run(source, target, **options):
        """{seed: (source, edited target, plain re-prompt or None)} as uint8 [64, 64, 3] arrays.

        All seeds go through one batched call (image k starts from seed k's latent).
        """
        results = edit_seeds(world_pipe, source, target, SEEDS, **world_settings, **options)
        return {seed: (as_rgb(r.source), as_rgb(r.targets[0]), as_rgb(r.reprompts[0]) if r.reprompts else None)
                for seed, r in zip(SEEDS, results)}

    return run


@pytest.fixture(scope="module")
def color_swaps(world):
    runs = {pair[0]: world(pair[0], pair[1]) for pair in COLOR_SWAPS}
    return {(source, seed): images for source, by_seed in runs.items() for seed, images in by_seed.items()}


def swap_figures(runs, label: str) -> dict:
    """Colour-swap figures over every pair and seed of ``runs`` ({(source, seed): images})."""
    cases = [colour_swap(seed, *runs[(source, seed)], before, after)
             for source, _, before, after, _ in COLOR_SWAPS for seed in SEEDS]
    figures = colour_swap_summary(cases)
    reprompt = ""
    if figures["reprompt_kept"] is not None:
        reprompt = f"; plain re-prompt keeps it in {figures['reprompt_kept']:.0%}"
    print(f"\ncolour swap, {label}, over {figures['cases']} source images: mask kept (IoU >= {MASK_IOU}) and "
          f"colour changed in {figures['kept']:.0%}{reprompt}; median IoU {figures['median_iou']:.2f}")
    return figures


@pytest.fixture(scope="module")
def color_swap_figures(color_swaps):
    return swap_figures(color_swaps, "prompt-to-prompt")


@pytest.fixture(scope="module")
def blended_swap_figures(world):
    """Prompt-to-prompt with local blending on the edited object's shape word (its attribute edit)."""
    runs = {}
    for source, target, before, _, _ in COLOR_SWAPS:
        by_seed = world(source, target, blend=dict(object_words(source))[before], threshold=BLEND_THRESHOLD)
        runs.update({(source, seed): images for seed, images in by_seed.items()})
    return swap_figures(runs, f"prompt-to-prompt + local blend (threshold {BLEND_THRESHOLD})")


def test_color_swap_keeps_the_mask_far_more_often_than_reprompting(color_swap_figures, blended_swap_figures):
    for figures in (color_swap_figures, blended_swap_figures):
        assert figures["cases"] >= 0.75 * len(COLOR_SWAPS) * len(SEEDS)  # the model draws what it is asked
        assert figures["changed"] >= 0.9  # the edit really recolours
        assert figures["reprompt_kept"] <= figures["kept"] - CLEAR_GAP


def test_color_swap_with_local_blend_keeps_the_mask_in_nine_of_ten_edits(blended_swap_figures):
    assert blended_swap_figures["kept"] >= KEEP_RATE


def test_the_attention_edit_matters_not_only_the_blend(world, blended_swap_figures):
    # The same local blend around a plainly sampled target (no replaced maps, no injection) keeps far less.
    runs = {}
    for source, target, before, _, _ in COLOR_SWAPS:
        by_seed = world(source, target, blend=dict(object_words(source))[before], threshold=BLEND_THRESHOLD,
                        cross_steps=0.0, self_steps=None, reprompt=False)
        runs.update({(source, seed): images for seed, images in by_seed.items()})
    blend_only = swap_figures(runs, "local blend alone")
    assert blend_only["kept"] <= blended_swap_figures["kept"] - 0.2


def test_shape_swap_keeps_position(world):
    source_prompt, target_prompt, color, shape = SHAPE_SWAP
    runs = world(source_prompt, target_prompt, reprompt=False)
    cases = [shape_swap(seed, *runs[seed][:2], color) for seed in SEEDS]
    drawn = [case for case in cases if case.drawn]
    kept = np.mean([case.kept for case in drawn])
    reshaped = np.mean([case.new_shape == shape for case in drawn])
    print(f"\nshape swap over {len(drawn)} source images: position kept (centroid within {POSITION_PX} px) in "
          f"{kept:.0%}, shape became a {shape} in {reshaped:.0%}")
    assert len(drawn) >= 0.75 * len(SEEDS)
    assert kept >= KEEP_RATE
    assert reshaped >= 0.75  # the edit really swapped the shape, it did not just copy the source


def test_local_blend_leaves_the_other_object_unchanged(world, color_swaps):
    source_prompt, target_prompt, before, after, other = COLOR_SWAPS[0]
    blended_ok, plain_ok, cases = 0, 0, 0
    runs = world(source_prompt, target_prompt, blend="circle", reprompt=False)
    for seed in SEEDS:
        source, target, _ = runs[seed]
        _, unblended, _ = color_swaps[(source_prompt, seed)]
        region = blob(source, other)
        if not region.any():
            continue
        cases += 1

        def unchanged(image):
            diff = np.abs(image.astype(int) - source.astype(int)).max(axis=-1)[region]  # worst channel per pixel
            return diff.mean() <= OTHER_MEAN and np.percentile(diff, 95) <= OTHER_P95

        blended_ok += unchanged(target)
        plain_ok += unchanged(unblended)
    print(f"\nlocal blend on 'circle' over {cases} images: the {other} object is unchanged (mean <= {OTHER_MEAN}, "
          f"95th percentile <= {OTHER_P95} levels) in {blended_ok / cases:.0%} of blended edits, "
          f"{plain_ok / cases:.0%} without blending")
    assert blended_ok / cases >= KEEP_RATE

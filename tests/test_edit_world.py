"""Prompt-to-prompt on the shapes-world model: edits keep the layout, plain re-prompts do not.

Effect tests of the issue, read with the world's rule-based colour segmenter
(no learned judge), over 16 seeds and two prompt pairs. They need the shipped
model in ``src/xattn/world/model/``. Run with ``pytest -s`` to print the
figures the issue's closing note states.

Only training combinations of colour and shape are used (the held-out ones,
e.g. "green circle", test composition, not editing).
"""

from __future__ import annotations

import numpy as np
import pytest

from xattn.edit import edit_seeds
from xattn.world import COLORS, classify_shape, segment
from xattn.world.segment import largest_component

pytestmark = pytest.mark.slow

SEEDS = list(range(16))
MIN_BLOB = 40  # pixels a colour needs to count as drawn (as the world's own evaluation)
MASK_IOU = 0.9  # "keeps the object's mask"
KEEP_RATE = 0.9  # the bar for edits
CLEAR_GAP = 0.25  # re-prompting must keep the mask at least this much less often
POSITION_PX = 4.0  # centroid shift, in pixels of the 64 x 64 image, that still counts as "same place"
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
SHAPE_SWAP = ("a red circle and a blue triangle", "a red square and a blue triangle", "red", "square")


def rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def blob(image: np.ndarray, color: str) -> np.ndarray:
    mask = largest_component(segment(image, color))
    return mask if mask.sum() >= MIN_BLOB else np.zeros_like(mask)


def object_mask(image: np.ndarray, color: str) -> np.ndarray:
    """The object of ``color`` bounded where its edge is half-way between white and the colour.

    Why not ``segment`` alone: it accepts pixels within a fixed distance of a
    palette colour, which cuts the anti-aliased edge of a colour far from
    white (red) further in than that of a colour near white (yellow), so
    comparing a red object with its yellow edit would measure the palette,
    not the layout.
    Here each pixel is placed on the line from white to each colour; it
    belongs to the colour whose line it lies nearest, if it is at least half
    way along it. The boundary is the same for every colour.
    """
    names = list(COLORS)
    white = np.full(3, 255.0)
    ink = white - np.array([COLORS[name] for name in names], dtype=np.float64)  # [k, 3]
    depth = white - image.astype(np.float64)  # [h, w, 3]
    along = depth @ ink.T / (ink**2).sum(axis=1)  # [h, w, k]: 0 at white, 1 at the colour
    off_line = np.linalg.norm(depth[..., None, :] - along[..., None] * ink, axis=-1)  # [h, w, k]
    index = names.index(color)
    mask = largest_component((off_line.argmin(axis=-1) == index) & (along[..., index] >= 0.5))
    return mask if mask.sum() >= MIN_BLOB else np.zeros_like(mask)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.fixture(scope="module")
def world(world_pipe, world_settings):
    pipe, settings = world_pipe, world_settings

    def run(source, target, **options):
        """{seed: (source, edited target, plain re-prompt or None)} as uint8 [64, 64, 3] arrays.

        All seeds go through one batched call (image k starts from seed k's latent).
        """
        results = edit_seeds(pipe, source, target, SEEDS, **settings, **options)
        return {seed: (rgb(r.source), rgb(r.targets[0]), rgb(r.reprompts[0]) if r.reprompts else None)
                for seed, r in zip(SEEDS, results)}

    return run


@pytest.fixture(scope="module")
def color_swaps(world):
    runs = {pair[0]: world(pair[0], pair[1]) for pair in COLOR_SWAPS}
    return {(source, seed): images for source, by_seed in runs.items() for seed, images in by_seed.items()}


def _color_swap_rates(color_swaps):
    """(edit rate, re-prompt rate, cases): how often the mask is kept (and the colour changed)."""
    edited_ok, reprompt_kept, cases = 0, 0, 0
    edit_ious, segment_ious = [], []
    for source_prompt, _, before, after, _ in COLOR_SWAPS:
        for seed in SEEDS:
            source, target, reprompt = color_swaps[(source_prompt, seed)]
            original = object_mask(source, before)
            if not original.any():
                continue  # the source image did not draw the object; nothing to keep
            cases += 1
            recoloured = object_mask(target, after)
            changed = recoloured.any() and not blob(target, before).any()
            edit_ious.append(iou(original, recoloured))
            segment_ious.append(iou(blob(source, before), blob(target, after)))  # for comparison only
            edited_ok += changed and edit_ious[-1] >= MASK_IOU
            reprompt_kept += iou(original, object_mask(reprompt, after)) >= MASK_IOU
    edit_rate, reprompt_rate = edited_ok / cases, reprompt_kept / cases
    print(f"\ncolour swap over {cases} source images: mask kept (IoU >= {MASK_IOU}) and colour changed in "
          f"{edit_rate:.0%} of edits; plain re-prompt keeps the mask in {reprompt_rate:.0%}; median IoU "
          f"{np.median(edit_ious):.2f} (with world.segment's masks {np.median(segment_ious):.2f})")
    return edit_rate, reprompt_rate, cases


def test_color_swap_keeps_the_mask_far_more_often_than_reprompting(color_swaps):
    edit_rate, reprompt_rate, cases = _color_swap_rates(color_swaps)
    assert cases >= 0.75 * len(COLOR_SWAPS) * len(SEEDS)  # the model draws what it is asked
    assert reprompt_rate <= edit_rate - CLEAR_GAP


@pytest.mark.xfail(reason="issue 6 open: the shipped shapes-world model keeps the mask in 72% of colour swaps "
                          "(bar 90%); it draws yellow circles smaller than red ones", strict=False)
def test_color_swap_keeps_the_mask_in_nine_of_ten_edits(color_swaps):
    edit_rate, _, _ = _color_swap_rates(color_swaps)
    assert edit_rate >= KEEP_RATE


@pytest.mark.xfail(reason="issue 6 open: shape swaps keep the position in 88% of cases (bar 90%)", strict=False)
def test_shape_swap_keeps_position(world):
    source_prompt, target_prompt, color, shape = SHAPE_SWAP
    kept, reshaped, cases = 0, 0, 0
    runs = world(source_prompt, target_prompt, reprompt=False)
    for seed in SEEDS:
        source, target, _ = runs[seed]
        before, after = blob(source, color), blob(target, color)
        if not before.any():
            continue
        cases += 1
        if after.any():
            kept += np.linalg.norm(centroid(before) - centroid(after)) <= POSITION_PX
            reshaped += classify_shape(after) == shape
    print(f"\nshape swap over {cases} source images: position kept (centroid within {POSITION_PX} px) in "
          f"{kept / cases:.0%}, shape became a {shape} in {reshaped / cases:.0%}")
    assert kept / cases >= KEEP_RATE
    assert reshaped / cases >= 0.75  # the edit really swapped the shape, it did not just copy the source


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

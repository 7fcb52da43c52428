"""The measures the shapes-world edit tests and scripts/eval_edits.py rely on, checked on rendered scenes."""

from __future__ import annotations

import numpy as np

from xattn.world import COLORS, make_scene
from xattn.world.measure import blob, colour_swap, mask_iou, object_extent, shape_swap
from xattn.world.scenes import BACKGROUND, shape_mask


def test_object_extent_recovers_ground_truth_masks():
    for seed in range(20):
        scene = make_scene(seed, n_objects=2)
        if scene.objects[0].color == scene.objects[1].color:
            continue
        for obj in scene.objects:
            assert mask_iou(object_extent(scene.image, obj.color), obj.mask) >= 0.99, (seed, obj.color)


def soft_render(color: str, cy: float = 32.0, cx: float = 30.0, shape: str = "circle") -> tuple[np.ndarray, np.ndarray]:
    """A shape in ``color`` on white with a blurred, anti-aliased edge, and its exact mask."""
    mask = shape_mask(shape, cy, cx, 9.0)
    coverage = mask.astype(np.float64)
    for axis in (0, 1):  # a 3-tap box blur along each axis
        coverage = (np.roll(coverage, 1, axis) + coverage + np.roll(coverage, -1, axis)) / 3
    white = np.full(3, 255.0)
    image = white + coverage[..., None] * (np.array(COLORS[color], dtype=np.float64) - white)
    return image.round().astype(np.uint8), mask


def test_same_shape_in_two_colours_gives_the_same_object_extent():
    red, mask = soft_render("red")
    yellow, _ = soft_render("yellow")
    assert mask_iou(object_extent(red, "red"), object_extent(yellow, "yellow")) >= 0.98
    assert mask_iou(object_extent(yellow, "yellow"), mask) >= 0.9
    # the fixed-radius segmenter cuts red's edge (far from white) further in than yellow's: why object_extent exists
    assert blob(red, "red").sum() < blob(yellow, "yellow").sum()


def test_colour_swap_is_kept_only_in_place_and_recoloured():
    red, _ = soft_render("red")
    assert colour_swap(0, red, soft_render("yellow")[0], None, "red", "yellow").kept
    moved = colour_swap(0, red, soft_render("yellow", cy=34.0, cx=32.0)[0], None, "red", "yellow")
    assert moved.changed and not moved.kept and moved.iou < 0.9
    assert np.allclose(moved.shift, (2.0, 2.0), atol=0.1)
    unchanged = colour_swap(0, red, red, red, "red", "yellow")  # the "edit" kept the old colour
    assert not unchanged.changed and not unchanged.kept and not unchanged.reprompt_kept
    blank = np.full_like(red, BACKGROUND)
    assert not colour_swap(0, blank, red, None, "green", "red").drawn


def test_shape_swap_measures_the_move_and_the_new_shape():
    circle, _ = soft_render("red", shape="circle")
    square, _ = soft_render("red", cy=33.0, shape="square")
    case = shape_swap(0, circle, square, "red")
    assert case.kept and abs(case.moved_px - 1.0) < 0.3 and case.new_shape == "square"
    far, _ = soft_render("red", cy=45.0, shape="square")
    assert not shape_swap(0, circle, far, "red").kept

"""Pictures: overlays use matplotlib's colormap exactly; grids, strips and breakdowns have one panel each."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import xattn
from xattn.capture import Capture, pictures


def test_overlay_blends_the_colormap_over_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    heat = torch.linspace(0, 1, 24).view(6, 4)
    expected_colours = matplotlib.colormaps["viridis"](heat.double().numpy())[..., :3] * 255
    only_map = np.asarray(pictures.overlay(image, heat, cmap="viridis", alpha=1.0)).astype(float)
    assert np.abs(only_map - expected_colours).max() <= 1.0
    only_image = np.asarray(pictures.overlay(image, heat, alpha=0.0))
    assert np.array_equal(only_image, image)
    half = np.asarray(pictures.overlay(image, heat, cmap="viridis", alpha=0.5)).astype(float)
    assert np.abs(half - (0.5 * image + 0.5 * expected_colours)).max() <= 1.5


def test_overlay_resizes_the_map_and_refuses_bad_input():
    image = Image.new("RGB", (8, 8), "white")
    assert pictures.overlay(image, torch.rand(4, 4)).size == (8, 8)
    with pytest.raises(ValueError, match="colormap"):
        pictures.overlay(image, torch.rand(4, 4), cmap="no-such-map")
    with pytest.raises(ValueError, match="alpha"):
        pictures.overlay(image, torch.rand(4, 4), alpha=2)
    with pytest.raises(ValueError, match=r"one \[H, W\] map"):
        pictures.overlay(image, torch.rand(2, 4, 4))


def _maps(pipe, per_step):
    capture = Capture(per_step=per_step)
    with xattn.hooks(pipe, capture):
        image = pipe("a red cat", num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                     generator=torch.Generator().manual_seed(0)).images[0]
    return image, capture.maps()


def _panels(picture: Image.Image) -> int:
    """Count the panels by their titles' gaps: the width grows by one panel per map."""
    return round(picture.width / (pictures.PANEL_INCHES * 100))


def test_grid_strip_and_breakdown_have_a_panel_per_item(sd1_pipe):
    image, maps = _maps(sd1_pipe, per_step=True)
    assert _panels(pictures.word_grid(image, maps)) == 1 + 3  # the image, then a, red, cat
    assert _panels(pictures.step_strip(image, maps, "cat")) == 4  # one per step
    assert _panels(pictures.step_strip(image, maps, "cat", max_panels=2)) == 2
    assert _panels(pictures.resolution_breakdown(image, maps, "cat")) == 3 + 1  # 16, 8, 4, combined


def test_step_strip_needs_per_step_maps(sd1_pipe):
    image, maps = _maps(sd1_pipe, per_step=False)
    with pytest.raises(ValueError, match="per_step=True"):
        pictures.step_strip(image, maps, "cat")

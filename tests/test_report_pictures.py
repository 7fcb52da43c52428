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


# -- scales and the colour bar ------------------------------------------------------------------

def _weak_and_strong_maps():
    """Word maps of "a red cat" at the image's own size (4x4, so no resampling): ``a`` weak, ``red`` strong."""
    import tiny_models
    from xattn.capture import MapLayer, WordMaps
    from xattn.hookpoints import Row
    from xattn.tokens import TokenMap

    token_map = TokenMap(tiny_models.tokenizer(), "a red cat")
    data = torch.full((1, 1, 16, 77), 0.001)  # [rows, heads, i, j]
    blob = torch.zeros(16)
    blob[[5, 6, 9, 10]] = 1.0  # the middle 2x2 of the 4x4 grid
    data[0, 0, :, token_map.indices("a")[0]] = 0.02 + 0.03 * blob
    data[0, 0, :, token_map.indices("red")[0]] = 0.05 + 0.75 * blob
    data[0, 0, :, token_map.indices("cat")[0]] = 0.10 + 0.20 * (1 - blob)
    layer = MapLayer("cross", (4, 4), (0,), ("up_blocks.0.attn2",), 1, None, data=data)
    maps = WordMaps([layer], rows=(Row(True, 0, 0),), columns=None, prompts=["a red cat"], token_maps=[token_map],
                    image_size=(4, 4))
    raw = {word: data[0, 0, :, token_map.indices(word)[0]].view(4, 4).double() for word in ("a", "red", "cat")}
    return maps, raw


def _colours(values, cmap="inferno"):
    return np.asarray(matplotlib.colormaps[cmap](np.asarray(values, dtype=float)))[..., :3] * 255


def test_shared_scale_keeps_a_weak_word_dim():
    maps, raw = _weak_and_strong_maps()
    image = np.zeros((4, 4, 3), np.uint8)
    top = max(float(heat.max()) for heat in raw.values())  # 0.8, on red's blob
    panels, colour_range = pictures.word_panels(image, maps, alpha=1.0, scale="shared")
    assert colour_range == pytest.approx((0.0, top))
    shown = {title.split(" ")[0]: np.asarray(panel).astype(float) for title, panel in panels}
    for word, heat in raw.items():  # every pixel is the colormap at value / the largest value of any word
        assert np.abs(shown[word] - _colours(heat.numpy() / top)).max() <= 1.0, word
    brightness = {word: pixels.mean() for word, pixels in shown.items()}
    assert brightness["a"] < brightness["red"]
    assert shown["a"].max() < _colours(0.25).max()  # a's brightest pixel is darker than a quarter of the scale
    # Per-panel scaling stretches each word to the full range: a's blob is as bright as red's.
    panels, colour_range = pictures.word_panels(image, maps, alpha=1.0, scale="panel")
    assert colour_range == (0.0, 1.0)
    shown = {title.split(" ")[0]: np.asarray(panel).astype(float) for title, panel in panels}
    for word, heat in raw.items():
        expected = (heat - heat.min()) / (heat.max() - heat.min())
        assert np.abs(shown[word] - _colours(expected.numpy())).max() <= 1.0, word
    assert np.array_equal(shown["a"], shown["red"])  # the same blob shape, stretched to the same colours
    with pytest.raises(ValueError, match="scale must be"):
        pictures.word_grid(image, maps, scale="loud")


@pytest.mark.parametrize("scale", ["shared", "panel"])
def test_grids_draw_a_colour_bar(scale):
    maps, _ = _weak_and_strong_maps()
    image = np.zeros((4, 4, 3), np.uint8)
    picture = pictures.word_grid(image, maps, scale=scale, cmap="viridis")
    pixels = np.asarray(picture).astype(float)
    assert picture.width == round(100 * (4 * pictures.PANEL_INCHES + pictures.COLORBAR_INCHES))
    bar = pixels[:, -round(100 * pictures.COLORBAR_INCHES):]  # the strip added on the right
    lookup = _colours(np.linspace(0, 1, 256), "viridis")  # [256, 3]
    distance = np.abs(bar[:, :, None, :] - lookup).max(axis=-1)  # [H, W, 256]
    on_map = distance.min(axis=-1) <= 4  # pixels of the colormap (the labels and the frame are grey or black)
    column = on_map.sum(axis=0).argmax()  # the bar's middle column
    values = distance[on_map[:, column], column].argmin(axis=-1) / 255  # colour -> value, top to bottom
    assert len(values) >= 100  # the bar spans most of the picture's height
    assert values[0] >= 0.95 and values[-1] <= 0.05  # from the top of the scale to its bottom
    assert np.all(np.diff(values) <= 0.02)  # never brighter further down
    without = pictures._figure([("image", Image.new("RGB", (4, 4)))], title=None)
    assert without.width == round(100 * pictures.PANEL_INCHES)  # no bar where none is asked for

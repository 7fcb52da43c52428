"""Pictures of word maps: an overlay, a grid of every word, a per-step strip, a per-resolution breakdown.

Colours come from matplotlib's colormaps (perceptually uniform ``inferno`` by
default); grids are matplotlib figures rendered off-screen (no pyplot state),
returned as PIL images so callers save or embed them as they like.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .heatmaps import WordMaps

DEFAULT_CMAP = "inferno"
DEFAULT_ALPHA = 0.6  # weight of the heat colours over the image
PANEL_INCHES = 1.8  # side of one grid panel
MAX_STRIP_PANELS = 10  # a per-step strip groups steps into at most this many windows


def colorize(heat: torch.Tensor | np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """A [H, W] map in [0, 1] as uint8 RGB [H, W, 3] through a matplotlib colormap."""
    values = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}; use a matplotlib name such as 'inferno' or 'viridis'") from None
    return (colormap(values)[..., :3] * 255).round().astype(np.uint8)


def overlay(image: Image.Image | np.ndarray, heat: torch.Tensor, *, cmap: str = DEFAULT_CMAP,
            alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """The image with a word map blended over it.

    Args:
        image: the generated image (PIL or uint8 [H, W, 3]).
        heat: a [h, w] map in [0, 1] (``maps.word(...)``); resized to the image if needed.
        cmap: a matplotlib colormap name.
        alpha: 0 shows only the image, 1 only the map.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    picture = _as_pil(image)
    heat = torch.as_tensor(heat, dtype=torch.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat must be one [H, W] map, got shape {tuple(heat.shape)}")
    size = (picture.height, picture.width)
    if tuple(heat.shape) != size:
        heat = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]  # [H, W]
    colours = Image.fromarray(colorize(heat, cmap))
    return Image.blend(picture, colours, alpha)


def word_grid(image, maps: WordMaps, prompt: int = 0, image_index: int = 0, *, words: list[str] | None = None,
              cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """The image, then one overlay per word of the prompt, titled with the word's share of attention."""
    words = maps.words(prompt) if words is None else words
    totals = maps.token_totals(prompt, image_index)
    panels = [("image", _as_pil(image))]
    for word in words:
        heat = maps.word(word, prompt, image_index)
        share = totals.get(word)
        title = word if share is None else f"{word} ({share:.1%})"
        panels.append((title, overlay(image, heat, cmap=cmap, alpha=alpha)))
    return _figure(panels, title=maps.prompts[prompt] if maps.prompts else None)


def step_strip(image, maps: WordMaps, word: str, prompt: int = 0, image_index: int = 0, *,
               max_panels: int = MAX_STRIP_PANELS, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """How a word's map evolves over the denoising steps (needs a per-step capture)."""
    if not maps.per_step:
        raise ValueError("a step strip needs maps per step: capture with Capture(per_step=True) or `--per-step`")
    steps = maps.steps
    windows = [list(chunk) for chunk in np.array_split(steps, min(max_panels, len(steps))) if len(chunk)]
    panels = []
    for window in windows:
        heat = maps.word(word, prompt, image_index, steps=window)
        label = f"step {window[0]}" if len(window) == 1 else f"steps {window[0]}-{window[-1]}"
        panels.append((label, overlay(image, heat, cmap=cmap, alpha=alpha)))
    return _figure(panels, title=f"{word!r} over the steps")


def resolution_breakdown(image, maps: WordMaps, word: str, prompt: int = 0, image_index: int = 0, *,
                         cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """A word's map from each captured resolution alone, then all combined."""
    panels = []
    for h, w in maps.resolutions:
        heat = maps.word(word, prompt, image_index, res=(h, w))
        panels.append((f"{h}x{w}", overlay(image, heat, cmap=cmap, alpha=alpha)))
    panels.append(("combined", overlay(image, maps.word(word, prompt, image_index), cmap=cmap, alpha=alpha)))
    return _figure(panels, title=f"{word!r} by resolution")


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _figure(panels: list[tuple[str, Image.Image]], *, title: str | None) -> Image.Image:
    """Panels side by side with titles, rendered off-screen to a PIL image."""
    figure = Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + (0.5 if title else 0.3)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, picture) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # [H, W, 4]
    return Image.fromarray(rgba[..., :3].copy())

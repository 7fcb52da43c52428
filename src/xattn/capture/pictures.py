"""Pictures of word maps: an overlay, a grid of every word, a per-step strip, a per-resolution breakdown.

Colours come from matplotlib's colormaps (perceptually uniform ``inferno`` by
default); grids are matplotlib figures rendered off-screen (no pyplot state),
returned as PIL images so callers save or embed them as they like. Every grid
has a colour bar and one of two scales:

- ``"shared"`` (default): one scale for every panel, from 0 to the largest
  mean attention probability of any panel, so a word the image barely looks
  at (``a``) stays dim next to one it looks at a lot (``red``);
- ``"panel"``: each panel from its own minimum to its own maximum, which shows
  the shape of a weak map at the cost of making every panel equally bright.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from .heatmaps import WordMaps

DEFAULT_CMAP = "inferno"
DEFAULT_ALPHA = 0.6  # weight of the heat colours over the image
PANEL_INCHES = 1.8  # side of one grid panel
MAX_STRIP_PANELS = 10  # a per-step strip groups steps into at most this many windows
COLORBAR_INCHES = 0.8  # width added to a grid for its colour bar and its labels
SCALES = ("shared", "panel")
DEFAULT_SCALE = "shared"


def scale_maps(heats: list[torch.Tensor], scale: str = DEFAULT_SCALE) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """Raw word maps (mean attention probabilities) in [0, 1] for display, and the range the colours span.

    ``"shared"``: every map divided by the largest value of any (0 stays 0), range
    ``(0, that value)``; ``"panel"``: each map min-max scaled on its own, range ``(0, 1)``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(map(repr, SCALES))}, not {scale!r}")
    heats = [torch.as_tensor(heat, dtype=torch.float64) for heat in heats]
    if scale == "panel":
        return [_min_max(heat) for heat in heats], (0.0, 1.0)
    top = max((float(heat.max()) for heat in heats), default=0.0)
    return [heat / top if top > 0 else torch.zeros_like(heat) for heat in heats], (0.0, top)


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


def word_panels(image, maps: WordMaps, prompt: int = 0, image_index: int = 0, *, words: list[str] | None = None,
                scale: str = DEFAULT_SCALE, cmap: str = DEFAULT_CMAP,
                alpha: float = DEFAULT_ALPHA) -> tuple[list[tuple[str, Image.Image]], tuple[float, float]]:
    """The overlays of :func:`word_grid` (titled with each word's share of attention) and their colour range."""
    words = maps.words(prompt) if words is None else words
    totals = maps.token_totals(prompt, image_index)
    heats, colour_range = scale_maps([maps.word(word, prompt, image_index, normalize=False) for word in words], scale)
    panels = []
    for word, heat in zip(words, heats):
        share = totals.get(word)
        title = word if share is None else f"{word} ({share:.1%})"
        panels.append((title, overlay(image, heat, cmap=cmap, alpha=alpha)))
    return panels, colour_range


def word_grid(image, maps: WordMaps, prompt: int = 0, image_index: int = 0, *, words: list[str] | None = None,
              scale: str = DEFAULT_SCALE, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """The image, then one overlay per word of the prompt, titled with the word's share of attention.

    Args:
        scale: ``"shared"`` (one colour scale for every word: weak words stay dim) or
            ``"panel"`` (each word from its own minimum to its maximum).
    """
    panels, colour_range = word_panels(image, maps, prompt, image_index, words=words, scale=scale, cmap=cmap,
                                       alpha=alpha)
    return _figure([("image", _as_pil(image))] + panels, title=maps.prompts[prompt] if maps.prompts else None,
                   colorbar=_colour_bar(colour_range, scale, cmap))


def concept_grid(image, found, row: int = -1, *, kind: str = "output", cmap: str = DEFAULT_CMAP,
                 alpha: float = DEFAULT_ALPHA, title: str | None = None) -> Image.Image:
    """The image, then one overlay per concept of an :func:`xattn.concepts` block.

    Concept maps are a softmax over the concepts at each image token, so they
    share one 0..1 colour scale: a panel is bright where its concept wins.

    Args:
        found: the :class:`~xattn.ConceptMaps` of the run.
        row: the transformer's batch row (default: the last, the conditional row of one image).
        kind: ``"output"`` (ConceptAttention's output space) or ``"cross"``.
    """
    maps = found.maps(kind)[row]  # [concepts, h, w]
    panels = [(concept, overlay(image, maps[n], cmap=cmap, alpha=alpha)) for n, concept in enumerate(found.concepts)]
    return _figure([("image", _as_pil(image))] + panels, title=title, colorbar=(0.0, 1.0, "concept share", cmap))


def step_strip(image, maps: WordMaps, word: str, prompt: int = 0, image_index: int = 0, *,
               max_panels: int = MAX_STRIP_PANELS, scale: str = DEFAULT_SCALE, cmap: str = DEFAULT_CMAP,
               alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """How a word's map evolves over the denoising steps (needs a per-step capture)."""
    if not maps.per_step:
        raise ValueError("a step strip needs maps per step: capture with Capture(per_step=True) or `--per-step`")
    steps = maps.steps
    windows = [list(chunk) for chunk in np.array_split(steps, min(max_panels, len(steps))) if len(chunk)]
    heats, colour_range = scale_maps([maps.word(word, prompt, image_index, steps=window, normalize=False)
                                      for window in windows], scale)
    panels = []
    for window, heat in zip(windows, heats):
        label = f"step {window[0]}" if len(window) == 1 else f"steps {window[0]}-{window[-1]}"
        panels.append((label, overlay(image, heat, cmap=cmap, alpha=alpha)))
    return _figure(panels, title=f"{word!r} over the steps", colorbar=_colour_bar(colour_range, scale, cmap))


def resolution_breakdown(image, maps: WordMaps, word: str, prompt: int = 0, image_index: int = 0, *,
                         scale: str = DEFAULT_SCALE, cmap: str = DEFAULT_CMAP,
                         alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """A word's map from each captured resolution alone (every site), then the default combination."""
    labels = [f"{h}x{w}" for h, w in maps.resolutions] + ["combined"]
    raw = [maps.word(word, prompt, image_index, res=res, exclude=None, normalize=False) for res in maps.resolutions]
    heats, colour_range = scale_maps(raw + [maps.word(word, prompt, image_index, normalize=False)], scale)
    panels = [(label, overlay(image, heat, cmap=cmap, alpha=alpha)) for label, heat in zip(labels, heats)]
    return _figure(panels, title=f"{word!r} by resolution", colorbar=_colour_bar(colour_range, scale, cmap))


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _colour_bar(colour_range: tuple[float, float], scale: str, cmap: str) -> tuple[float, float, str, str]:
    label = "mean attention probability" if scale == "shared" else "each panel: its min to its max"
    return (*colour_range, label, cmap)


def _min_max(heat: torch.Tensor) -> torch.Tensor:
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low) if high > low else torch.zeros_like(heat)


def _figure(panels: list[tuple[str, Image.Image]], *, title: str | None,
            colorbar: tuple[float, float, str, str] | None = None) -> Image.Image:
    """Panels side by side with titles (and a colour bar: low, high, label, colormap), rendered off-screen."""
    extra = COLORBAR_INCHES if colorbar else 0.0
    width = PANEL_INCHES * len(panels) + extra
    figure = Figure(figsize=(width, PANEL_INCHES + (0.5 if title else 0.3)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, picture) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1 - extra / width, 1))
    if colorbar:
        low, high, label, cmap = colorbar
        left = 1 - extra / width
        bar = figure.add_axes((left + 0.05 / width, 0.12, 0.12 / width, 0.7))  # [left, bottom, width, height]
        mappable = ScalarMappable(norm=Normalize(low, high if high > low else low + 1), cmap=cmap)
        figure.colorbar(mappable, cax=bar)
        bar.tick_params(labelsize=6)
        bar.set_ylabel(label, fontsize=6)
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # [H, W, 4]
    return Image.fromarray(rgba[..., :3].copy())

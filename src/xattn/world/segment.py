"""Read generated images back: colour segmentation and a blob shape classifier.

Why: colour/shape accuracy of generated images is measured without any
learned judge, so the numbers are as exact as the world itself.
"""
from __future__ import annotations

import numpy as np

from .scenes import COLORS

# A pixel belongs to colour c if c is its nearest palette entry (white
# included) and it lies within this RGB distance of it.
MAX_DIST = 90.0


def _palette() -> tuple[list[str], np.ndarray]:
    names = ["white"] + list(COLORS)
    rgb = np.array([(255, 255, 255)] + [COLORS[n] for n in COLORS], np.float32)
    return names, rgb


def segment(image: np.ndarray, color: str, min_pixels: int = 0) -> np.ndarray:
    """Bool [h, w] mask of pixels whose nearest palette colour is ``color``."""
    names, rgb = _palette()
    px = image.astype(np.float32)[..., None, :]  # [h, w, 1, 3]
    dist = np.linalg.norm(px - rgb, axis=-1)  # [h, w, palette]
    nearest = dist.argmin(-1)
    mask = (nearest == names.index(color)) & (dist.min(-1) <= MAX_DIST)
    if mask.sum() < min_pixels:
        return np.zeros_like(mask)
    return mask


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, largest first (no scipy needed)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    found: list[list[tuple[int, int]]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(comp)
    out = []
    for comp in sorted(found, key=len, reverse=True):
        m = np.zeros_like(mask)
        ys, xs = zip(*comp)
        m[list(ys), list(xs)] = True
        out.append(m)
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    comps = components(mask)
    return comps[0] if comps else np.zeros_like(mask)


def classify_shape(mask: np.ndarray, min_pixels: int = 20) -> str | None:
    """circle / square / triangle from the blob's fill of its bounding box.

    An axis-aligned square fills ~100% of its box, a circle ~79%, an upright
    triangle ~50%; a triangle is also wider at the bottom than at the top.
    """
    blob = largest_component(mask)
    if blob.sum() < min_pixels:
        return None
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = blob[y0:y1, x0:x1]
    fill = box.mean()
    rows = box.sum(1)
    third = max(1, len(rows) // 3)
    top, bottom = rows[:third].mean(), rows[-third:].mean()
    if fill < 0.65 or bottom > 1.6 * top + 1:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def object_extent(image: np.ndarray, color: str, min_pixels: int = 40) -> np.ndarray:
    """The object of ``color``, bounded where its edge is half-way between white and the colour.

    Why not :func:`segment`: it accepts pixels within a fixed distance of a
    palette colour, which cuts the soft edge of a colour far from white (red)
    further in than that of a colour near white (yellow). Comparing a red
    object with its yellow edit would then measure the palette, not the
    layout. Here each pixel is placed on the line from white to each colour;
    it belongs to the colour whose line it lies nearest, if it is at least
    half-way along it, the same boundary for every colour.

    Returns the largest such 4-connected region, or an empty mask when it has
    fewer than ``min_pixels`` pixels (the colour counts as not drawn).
    """
    names = list(COLORS)
    white = np.full(3, 255.0)
    ink = white - np.array([COLORS[name] for name in names], dtype=np.float64)  # [k, 3]
    depth = white - image.astype(np.float64)  # [h, w, 3]
    along = depth @ ink.T / (ink**2).sum(axis=1)  # [h, w, k]: 0 at white, 1 at the colour
    off_line = np.linalg.norm(depth[..., None, :] - along[..., None] * ink, axis=-1)  # [h, w, k]
    index = names.index(color)
    mask = largest_component((off_line.argmin(axis=-1) == index) & (along[..., index] >= 0.5))
    return mask if mask.sum() >= min_pixels else np.zeros_like(mask)


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 0.0

"""Reading world images back: captions to objects, colour segmentation, object masks, shapes, IoU.

Why: every shapes-world figure (model card, word maps, reweighting, edits)
is read from pixels with these rules, never with a learned judge, so the
numbers are as exact as the world itself. Each rule is defined once here.
"""

from __future__ import annotations

import numpy as np

from ..scenes import COLORS, SHAPES

# A pixel belongs to colour c if c is its nearest palette entry (white
# included) and it lies within this RGB distance of it.
MAX_DIST = 90.0
MIN_BLOB = 40  # pixels a named colour needs to count as drawn


def object_words(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a world caption names, in order: ``[("red", "circle"), ...]``."""
    words = caption.split()
    return [(words[k], words[k + 1]) for k in range(len(words) - 1) if words[k] in COLORS and words[k + 1] in SHAPES]


def as_rgb(image) -> np.ndarray:
    """uint8 [h, w, 3] from a PIL image or an array."""
    return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)


def segment(image: np.ndarray, color: str, min_pixels: int = 0) -> np.ndarray:
    """Bool [h, w] mask of pixels whose nearest palette colour is ``color``."""
    names = ["white", *COLORS]
    rgb = np.array([(255, 255, 255)] + [COLORS[n] for n in COLORS], np.float32)  # [palette, 3]
    px = image.astype(np.float32)[..., None, :]  # [h, w, 1, 3]
    dist = np.linalg.norm(px - rgb, axis=-1)  # [h, w, palette]
    mask = (dist.argmin(-1) == names.index(color)) & (dist.min(-1) <= MAX_DIST)
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


def object_mask(image: np.ndarray, color: str) -> np.ndarray:
    """The object drawn in ``color``: the largest connected region of that colour.

    Stray pixels of a similar hue elsewhere (a tinted edge of the other
    object) are not part of it.
    """
    return largest_component(segment(image, color))


def blob(image: np.ndarray, color: str, min_pixels: int = MIN_BLOB) -> np.ndarray:
    """:func:`object_mask`, or an empty mask when it has fewer than ``min_pixels`` (not drawn)."""
    mask = object_mask(image, color)
    return mask if mask.sum() >= min_pixels else np.zeros_like(mask)


def foreground(image: np.ndarray) -> np.ndarray:
    """Non-white pixels that are close to some palette colour."""
    return np.any([segment(image, c) for c in COLORS], axis=0)


def dominant_color(image: np.ndarray) -> str | None:
    """The colour with the largest object, if it has at least :data:`MIN_BLOB` pixels."""
    counts = {c: int(object_mask(image, c).sum()) for c in COLORS}
    best = max(counts, key=counts.get)
    return best if counts[best] >= MIN_BLOB else None


def classify_shape(mask: np.ndarray, min_pixels: int = 20) -> str | None:
    """circle / square / triangle from the blob's fill of its bounding box.

    An axis-aligned square fills ~100% of its box, a circle ~79%, an upright
    triangle ~50%; a triangle is also wider at the bottom than at the top.
    """
    shape_blob = largest_component(mask)
    if shape_blob.sum() < min_pixels:
        return None
    ys, xs = np.nonzero(shape_blob)
    box = shape_blob[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = box.mean()
    rows = box.sum(1)
    third = max(1, len(rows) // 3)
    top, bottom = rows[:third].mean(), rows[-third:].mean()
    if fill < 0.65 or bottom > 1.6 * top + 1:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def object_extent(image: np.ndarray, color: str, min_pixels: int = MIN_BLOB) -> np.ndarray:
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


def drawn_as_named(image: np.ndarray, caption: str) -> bool:
    """Every object the caption names is drawn in its shape, and nothing else is (one blob per object)."""
    named = object_words(caption)
    blobs = sum(int(c.sum() >= MIN_BLOB) for c in components(foreground(image)))
    return blobs == len(named) and all(
        object_mask(image, colour).sum() >= MIN_BLOB and classify_shape(object_mask(image, colour)) == shape
        for colour, shape in named)


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 0.0


def touching(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two masks touch (4-neighbours); the world draws objects apart, with background between."""
    grown = first.copy()
    grown[1:] |= first[:-1]
    grown[:-1] |= first[1:]
    grown[:, 1:] |= first[:, :-1]
    grown[:, :-1] |= first[:, 1:]
    return bool(np.logical_and(grown, second).any())


def centroid(mask: np.ndarray) -> np.ndarray:
    """(y, x) of a non-empty mask's pixels, in image pixels."""
    return np.argwhere(mask).mean(axis=0)

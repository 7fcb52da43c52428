"""Did an edit keep the layout? Read from the images with the world's rule-based segmenter.

The shapes-world edit tests and ``scripts/eval_edits.py`` judge prompt-to-prompt
edits the same way, with these functions and thresholds (no learned judge):

- a colour swap keeps the object's mask when the source's object and the
  target's recoloured object overlap with IoU >= :data:`MASK_IOU`, measured
  with :func:`~xattn.world.measure.object_extent` (the same edge for every
  colour), and the old colour is gone;
- a shape swap keeps the position when the blob's centroid moves at most
  :data:`POSITION_PX` pixels, and it swapped the shape when the blob now
  classifies as the new shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pixels import MIN_BLOB, as_rgb, blob, centroid, classify_shape, mask_iou, object_extent

MASK_IOU = 0.9  # "keeps the object's mask"
POSITION_PX = 4.0  # centroid shift, in pixels of the 64 x 64 image, that still counts as "same place"


@dataclass(frozen=True)
class ColourSwap:
    """One colour-swap edit (``before`` -> ``after``) of one seed.

    Attributes:
        drawn: the source image drew the object (otherwise nothing can be kept).
        changed: the target drew the new colour and no blob of the old one.
        iou: source object vs target object (``object_extent`` masks).
        reprompt_iou: source object vs the plainly re-prompted target's, if sampled.
        shift: target centroid minus source centroid (y, x) in pixels, if both are drawn.
    """

    seed: int
    drawn: bool
    changed: bool
    iou: float
    reprompt_iou: float | None
    shift: tuple[float, float] | None

    @property
    def kept(self) -> bool:
        return self.changed and self.iou >= MASK_IOU

    @property
    def reprompt_kept(self) -> bool:
        return self.reprompt_iou is not None and self.reprompt_iou >= MASK_IOU


def colour_swap(seed: int, source, target, reprompt, before: str, after: str) -> ColourSwap:
    """Judge one colour swap from its images (PIL or uint8 arrays; ``reprompt`` may be None)."""
    source, target = as_rgb(source), as_rgb(target)
    original = object_extent(source, before, MIN_BLOB)
    recoloured = object_extent(target, after, MIN_BLOB)
    changed = bool(recoloured.any()) and not blob(target, before).any()
    reprompt_iou = None
    if reprompt is not None:
        reprompt_iou = mask_iou(original, object_extent(as_rgb(reprompt), after, MIN_BLOB))
    shift = None
    if original.any() and recoloured.any():
        shift = tuple(float(v) for v in centroid(recoloured) - centroid(original))
    return ColourSwap(seed, bool(original.any()), changed, mask_iou(original, recoloured), reprompt_iou, shift)


@dataclass(frozen=True)
class ShapeSwap:
    """One shape-swap edit of one seed: did the object stay put, and did it take the new shape?"""

    seed: int
    drawn: bool
    moved_px: float | None  # centroid distance, None when the target lost the object
    new_shape: str | None  # what the target's blob classifies as

    @property
    def kept(self) -> bool:
        return self.moved_px is not None and self.moved_px <= POSITION_PX


def shape_swap(seed: int, source, target, color: str) -> ShapeSwap:
    """Judge one shape swap of the object drawn in ``color``."""
    before, after = blob(as_rgb(source), color), blob(as_rgb(target), color)
    if not before.any() or not after.any():
        return ShapeSwap(seed, bool(before.any()), None, None)
    moved = float(np.linalg.norm(centroid(before) - centroid(after)))
    return ShapeSwap(seed, True, moved, classify_shape(after))


def colour_swap_summary(cases: list[ColourSwap]) -> dict:
    """Rates over the cases whose source drew the object, for tables and closing notes."""
    drawn = [case for case in cases if case.drawn]
    if not drawn:
        return {"cases": 0}
    shifts = np.array([case.shift for case in drawn if case.shift is not None])
    with_reprompt = [case for case in drawn if case.reprompt_iou is not None]
    return {
        "cases": len(drawn),
        "kept": float(np.mean([case.kept for case in drawn])),
        "changed": float(np.mean([case.changed for case in drawn])),
        "median_iou": float(np.median([case.iou for case in drawn])),
        "reprompt_kept": float(np.mean([case.reprompt_kept for case in with_reprompt])) if with_reprompt else None,
        "centroid_jitter_px": float(np.linalg.norm(shifts.std(axis=0))) if len(shifts) > 1 else None,
    }


__all__ = ["MASK_IOU", "POSITION_PX", "ColourSwap", "ShapeSwap", "colour_swap", "colour_swap_summary",
           "shape_swap"]

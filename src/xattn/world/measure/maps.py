"""Score word maps against ground-truth masks (the word-map figures of scripts/eval_maps.py).

Two numbers, both with an exact meaning:

- IoU: the map, scaled to [0, 1], thresholded at ``t``, against the word's
  object mask; reported for a sweep of thresholds and at the best one.
- own-vs-other: in a scene of two objects, does the word's (unscaled) map put
  more attention mass on its own object than on the other one? The win rate
  is the fraction of words for which it does.

:func:`score_world` runs this on the shapes world: it generates images for
captions, captures the maps, finds each named object by its colour (the
world's segmenter; the largest region of that colour) and scores every
colour and shape word. Images where a named object is missing, where the
two objects were drawn as one touching blob, or where an object of the
named colour has another shape than the caption gives it (the model bound
the shapes to the wrong colours, so finding objects by colour would score
each shape word against the other object), are skipped and listed: they
measure the generator, not the maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .pixels import MIN_BLOB, classify_shape, mask_iou, object_mask, object_words, touching

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
MIN_OBJECT_PIXELS = MIN_BLOB  # a named colour needs this many pixels to count as drawn


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values)


def _check_same_shape(heat: np.ndarray, mask: np.ndarray) -> None:
    if heat.shape != mask.shape:
        raise ValueError(f"map {heat.shape} and mask {mask.shape} differ in size; make the maps at the mask's size "
                         "(maps.word(..., size=mask.shape))")


def iou(heat, mask, threshold: float) -> float:
    """IoU of ``heat >= threshold`` with a boolean ``mask`` (both [H, W]); 0 when both are empty."""
    heat, mask = _as_array(heat).astype(np.float64), _as_array(mask).astype(bool)
    _check_same_shape(heat, mask)
    return mask_iou(heat >= threshold, mask)


def iou_sweep(heat, mask, thresholds=DEFAULT_THRESHOLDS) -> np.ndarray:
    """IoU at every threshold of the sweep."""
    return np.array([iou(heat, mask, t) for t in thresholds])


def mass(heat, mask) -> float:
    """Attention mass of ``heat`` inside ``mask``."""
    heat, mask = _as_array(heat).astype(np.float64), _as_array(mask).astype(bool)
    _check_same_shape(heat, mask)
    return float(heat[mask].sum())


@dataclass
class WordScore:
    """One word of one image, scored against its object."""

    prompt: str
    image: int
    word: str
    kind: str  # "colour" or "shape"
    ious: np.ndarray  # one per threshold of the sweep
    own_mass: float
    other_mass: float | None  # None in a one-object scene

    @property
    def wins(self) -> bool | None:
        return None if self.other_mass is None else self.own_mass > self.other_mass


def score_word(heat_normalised, heat_raw, own_mask, other_mask=None, *, prompt: str = "", image: int = 0,
               word: str = "", kind: str = "", thresholds=DEFAULT_THRESHOLDS) -> WordScore:
    """Score one word's map: IoU sweep of the scaled map, mass of the raw map on its own and the other object."""
    return WordScore(
        prompt=prompt, image=image, word=word, kind=kind,
        ious=iou_sweep(heat_normalised, own_mask, thresholds),
        own_mass=mass(heat_raw, own_mask),
        other_mass=None if other_mask is None else mass(heat_raw, other_mask),
    )


@dataclass
class Summary:
    """The table's numbers for a group of word scores."""

    label: str
    words: int
    thresholds: tuple[float, ...]
    mean_ious: np.ndarray  # per threshold
    win_rate: float | None  # over words in two-object scenes
    contests: int  # words in two-object scenes

    @property
    def best_threshold(self) -> float:
        return self.thresholds[int(np.argmax(self.mean_ious))]

    @property
    def best_iou(self) -> float:
        return float(np.max(self.mean_ious))


def summarize(scores: list[WordScore], label: str = "all", thresholds=DEFAULT_THRESHOLDS) -> Summary:
    """Mean IoU per threshold and the win rate over ``scores``."""
    if not scores:
        raise ValueError(f"no word scores to summarise for {label!r}")
    contests = [s.wins for s in scores if s.wins is not None]
    return Summary(
        label=label, words=len(scores), thresholds=tuple(thresholds),
        mean_ious=np.mean([s.ious for s in scores], axis=0),
        win_rate=float(np.mean(contests)) if contests else None,
        contests=len(contests),
    )


def format_table(summaries: list[Summary], *, sweep: bool = True) -> str:
    """A plain-text table: best IoU, its threshold, win rate; then the sweep."""
    lines = [f"{'words':<10}{'n':>5}{'best IoU':>10}{'at t':>7}{'win rate':>10}{'contests':>10}"]
    for s in summaries:
        win = "-" if s.win_rate is None else f"{s.win_rate:.1%}"
        lines.append(f"{s.label:<10}{s.words:>5}{s.best_iou:>10.3f}{s.best_threshold:>7.2f}{win:>10}{s.contests:>10}")
    if sweep:
        lines.append("")
        lines.append("mean IoU by threshold: " + "  ".join(f"{t:.2f}" for t in summaries[0].thresholds))
        for s in summaries:
            lines.append(f"  {s.label:<20}" + "  ".join(f"{v:.2f}" for v in s.mean_ious))
    return "\n".join(lines)


# -- the shapes world -------------------------------------------------------------------------------

@dataclass
class WorldResult:
    """Scores of a shapes-world run, and the images that could not be scored (a named colour missing)."""

    scores: list[WordScore]
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (prompt, image, why)

    def summaries(self, thresholds=DEFAULT_THRESHOLDS) -> list[Summary]:
        groups = [("colour", [s for s in self.scores if s.kind == "colour"]),
                  ("shape", [s for s in self.scores if s.kind == "shape"]), ("all", self.scores)]
        return [summarize(group, label, thresholds) for label, group in groups if group]


def score_world_images(maps, images: list[np.ndarray], thresholds=DEFAULT_THRESHOLDS,
                       min_pixels: int = MIN_OBJECT_PIXELS) -> WorldResult:
    """Score the colour and shape words of every prompt and image of a capture.

    Args:
        maps: ``capture.maps()`` of a shapes-world call.
        images: uint8 [H, W, 3] arrays in the pipeline's order (prompt by prompt).
        thresholds: the IoU sweep.
        min_pixels: a named colour with fewer pixels means the object was not drawn: the image is skipped
            (as is one whose two objects touch, i.e. were drawn as one blob). Skips are listed in the result.
    """
    result = WorldResult(scores=[])
    for p, caption in enumerate(maps.prompts):
        named = object_words(caption)
        if not named:
            raise ValueError(f"{caption!r} names no coloured shape; expected captions like 'a red circle and a blue square'")
        for i in range(maps.images_per_prompt):
            picture = images[p * maps.images_per_prompt + i]
            masks = [object_mask(picture, colour) for colour, _ in named]
            missing = [colour for (colour, _), m in zip(named, masks) if m.sum() < min_pixels]
            if missing:
                result.skipped.append((caption, i, f"no {', '.join(missing)} object drawn"))
                continue
            if len(masks) == 2 and touching(*masks):
                result.skipped.append((caption, i, "the two objects touch: drawn as one blob, not two objects"))
                continue
            drawn = [classify_shape(mask) for mask in masks]
            unbound = [f"{colour} {got or 'blob'}, not a {colour} {shape}"
                       for (colour, shape), got in zip(named, drawn) if got != shape]
            if unbound:
                result.skipped.append((caption, i, f"drawn as a {'; '.join(unbound)}"))
                continue
            seen: dict[str, int] = {}
            for k, (colour, shape) in enumerate(named):
                other = masks[1 - k] if len(named) == 2 else None
                for word, kind in ((colour, "colour"), (shape, "shape")):
                    seen[word] = seen.get(word, 0) + 1
                    key = f"{word}#{seen[word]}"
                    size = masks[k].shape
                    result.scores.append(score_word(
                        maps.word(key, p, i, size=size), maps.word(key, p, i, size=size, normalize=False),
                        masks[k], other, prompt=caption, image=i, word=word, kind=kind, thresholds=thresholds))
    return result


def score_world(pipe, prompts: list[str], *, seed: int = 0, images_per_prompt: int = 1, steps: int = 25,
                guidance: float = 5.0, selector=None, thresholds=DEFAULT_THRESHOLDS) -> WorldResult:
    """Generate the prompts on a shapes-world pipeline with a capture running, and score the maps.

    Image ``k`` of the batch (prompt by prompt) uses seed ``seed + k``.
    """
    from ...capture import Capture
    from ...session import hooks

    capture = Capture(selector)
    generators = [torch.Generator().manual_seed(seed + k) for k in range(len(prompts) * images_per_prompt)]
    with hooks(pipe, capture):
        output = pipe(prompts, num_images_per_prompt=images_per_prompt, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generators, output_type="np")
    images = [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in output.images]
    return score_world_images(capture.maps(), images, thresholds)


__all__ = ["DEFAULT_THRESHOLDS", "MIN_OBJECT_PIXELS", "Summary", "WordScore", "WorldResult", "format_table", "iou",
           "iou_sweep", "mass", "score_word", "score_world", "score_world_images", "summarize"]

"""Losses on word maps that guidance minimises, each its own small class.

Every loss reads the word maps of one conditional row: ``maps`` is
``[H, W, j]``, the attention of every pixel over the text slots, with the
start token and padding removed and renormalised (Attend-and-Excite's
"attention for text"), and returns a scalar that gradient steps on the
latents make smaller. ``words()`` lists the words it needs, so the
controller resolves them to slots once per run.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import XattnError
from ..validate import OptionError, number

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the image, x to the right


class GuidanceError(XattnError, ValueError):
    """A guidance loss that cannot be built as asked."""


def _smooth(maps: torch.Tensor, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """Gaussian smoothing of ``[k, H, W]`` maps (Attend-and-Excite smooths before taking the maximum)."""
    offsets = torch.arange(size, dtype=maps.dtype, device=maps.device) - (size - 1) / 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    kernel2d = (kernel[:, None] * kernel[None, :])[None, None]  # [1, 1, s, s]
    padded = F.pad(maps[:, None], (size // 2,) * 4, mode="reflect")
    return F.conv2d(padded, kernel2d)[:, 0]


def _normalised(word_map: torch.Tensor) -> torch.Tensor:
    """A ``[H, W]`` map as a distribution over pixels."""
    return word_map / word_map.sum().clamp(min=1e-12)


def _symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.clamp(min=1e-12), q.clamp(min=1e-12)
    return 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())


class Loss:
    """Base: a weighted loss on word maps; ``words()`` are resolved to slots by the controller."""

    weight: float = 1.0
    lower_bound: float = float("-inf")  # the smallest value the loss can take (refinement targets below it are refused)

    def words(self) -> list[str]:
        raise NotImplementedError

    def __call__(self, word_maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``word_maps``: word -> ``[H, W]`` map of one row. Returns a scalar."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError


def _checked_words(words, what: str) -> list[str]:
    words = [words] if isinstance(words, str) else list(words)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise GuidanceError(f"{what} needs one or more words, not {words!r}")
    return [w.strip() for w in words]


def _finite(value, name: str) -> float:
    try:
        return number(value, name)
    except OptionError as error:
        raise GuidanceError(str(error)) from None


def _checked_weight(weight: float, what: str) -> float:
    weight = _finite(weight, f"{what} weight")
    if not (weight > 0 and weight < 1e6):
        raise GuidanceError(f"{what} weight must be a positive finite number, not {weight!r}")
    return weight


class Excite(Loss):
    """Attend-and-Excite (Chefer et al. 2023): raise the weakest word's peak attention.

    ``1 - min_w max(smooth(A_w))``: every listed word must own some pixel.
    """

    lower_bound = 0.0

    def __init__(self, words: str | Sequence[str], weight: float = 1.0):
        self.targets = _checked_words(words, "Excite")
        self.weight = _checked_weight(weight, "Excite")

    def words(self) -> list[str]:
        return list(self.targets)

    def __call__(self, word_maps):
        stacked = torch.stack([word_maps[w] for w in self.targets])  # [k, H, W]
        peaks = _smooth(stacked).flatten(1).amax(dim=1)  # [k]
        return (1.0 - peaks).clamp(min=0).max()

    def to_dict(self) -> dict:
        return {"loss": "excite", "words": self.targets, "weight": self.weight}


class Bind(Loss):
    """Attribute binding in the spirit of SynGen (Rassin et al. 2023): each modifier's map onto its noun's.

    For each ``modifier: noun`` pair: the symmetric KL divergence between the
    two maps (as distributions over pixels), minus its mean divergence from
    the other pairs' nouns, so a modifier is pulled onto its own noun and
    pushed off the others.
    """

    def __init__(self, pairs: Mapping[str, str], weight: float = 1.0):
        if not isinstance(pairs, Mapping) or not pairs:
            raise GuidanceError(f"Bind needs modifier -> noun pairs such as {{'red': 'circle'}}, not {pairs!r}")
        self.pairs = {m.strip(): n.strip() for m, n in pairs.items()}
        _checked_words(list(self.pairs) + list(self.pairs.values()), "Bind")
        self.weight = _checked_weight(weight, "Bind")

    def words(self) -> list[str]:
        return list(dict.fromkeys([*self.pairs, *self.pairs.values()]))

    def __call__(self, word_maps):
        nouns = list(dict.fromkeys(self.pairs.values()))
        total = 0.0
        for modifier, noun in self.pairs.items():
            p = _normalised(word_maps[modifier])
            total = total + _symmetric_kl(p, _normalised(word_maps[noun]))
            others = [n for n in nouns if n != noun]
            if others:
                total = total - sum(_symmetric_kl(p, _normalised(word_maps[n])) for n in others) / len(others)
        return total / len(self.pairs)

    def to_dict(self) -> dict:
        return {"loss": "bind", "pairs": dict(self.pairs), "weight": self.weight}


class Layout(Loss):
    """Box guidance (as in Chen et al. 2023's layout guidance): each phrase's attention inside its box.

    ``1 - (mass of the phrase's map inside the box) / (its total mass)``,
    summed over phrases. A phrase's map is the mean of its words' maps.
    Boxes are ``(x0, y0, x1, y1)`` fractions of the image.
    """

    lower_bound = 0.0

    def __init__(self, boxes: Mapping[str, Box], weight: float = 1.0):
        if not isinstance(boxes, Mapping) or not boxes:
            raise GuidanceError(f"Layout needs phrase -> box pairs such as {{'red circle': (0, 0, 0.5, 1)}}, "
                                f"not {boxes!r}")
        self.boxes: dict[str, Box] = {}
        for phrase, box in boxes.items():
            if isinstance(box, str) or not hasattr(box, "__iter__"):
                raise GuidanceError(f"box of {phrase!r} must be four numbers x0,y0,x1,y1, not {box!r}")
            values = tuple(_finite(v, f"box of {phrase!r}") for v in box)
            if len(values) != 4 or not all(0.0 <= v <= 1.0 for v in values) or not (
                    values[0] < values[2] and values[1] < values[3]):
                raise GuidanceError(f"box of {phrase!r} must be x0,y0,x1,y1 fractions in 0..1 with x0 < x1 and "
                                    f"y0 < y1, not {box!r}")
            self.boxes[phrase.strip()] = values
        self.weight = _checked_weight(weight, "Layout")

    def words(self) -> list[str]:
        return list(dict.fromkeys(w for phrase in self.boxes for w in phrase.split()))

    def __call__(self, word_maps):
        total = 0.0
        for phrase, (x0, y0, x1, y1) in self.boxes.items():
            phrase_map = torch.stack([word_maps[w] for w in phrase.split()]).mean(dim=0)  # [H, W]
            height, width = phrase_map.shape
            inside = torch.zeros_like(phrase_map)
            inside[round(y0 * height):max(round(y1 * height), round(y0 * height) + 1),
                   round(x0 * width):max(round(x1 * width), round(x0 * width) + 1)] = 1.0
            total = total + 1.0 - (phrase_map * inside).sum() / phrase_map.sum().clamp(min=1e-12)
        return total

    def to_dict(self) -> dict:
        return {"loss": "layout", "boxes": {k: list(v) for k, v in self.boxes.items()}, "weight": self.weight}


class Focus(Loss):
    """One object: the words' attention inside one disk, chosen by the image itself at its first guided pass.

    At the first pass of a run the disk (radius ``radius`` times the map's
    side) is centred where the words' summed, smoothed maps peak, and kept
    for the rest of the run; the loss is ``1 - mean_w (A_w inside) / (A_w total)``.
    A box the image picks for itself, as :class:`Layout` takes one from the
    user: attention that starts a second copy of the object, or draws its
    colour apart from its shape, is pulled back to the first. The disk is
    per image (the controller keeps it in ``state``).
    """

    lower_bound = 0.0
    stateful = True  # the controller passes each image's own ``state`` dict, kept for the run

    def __init__(self, words: str | Sequence[str], radius: float = 0.35, weight: float = 1.0):
        self.targets = _checked_words(words, "Focus")
        self.radius = _finite(radius, "Focus radius")
        if not 0 < self.radius <= 2:
            raise GuidanceError(f"Focus radius must be a fraction of the map's side in (0, 2], not {radius!r}")
        self.weight = _checked_weight(weight, "Focus")

    def words(self) -> list[str]:
        return list(self.targets)

    def __call__(self, word_maps, state=None):
        stacked = torch.stack([word_maps[w] for w in self.targets])  # [k, H, W]
        state = {} if state is None else state
        if "disk" not in state:
            with torch.no_grad():
                summed = _smooth((stacked / stacked.flatten(1).sum(1).clamp(min=1e-12)[:, None, None]).sum(0)[None])[0]
                height, width = summed.shape
                peak = int(summed.flatten().argmax())
                rows = torch.arange(height, device=summed.device)[:, None] - peak // width
                cols = torch.arange(width, device=summed.device)[None, :] - peak % width
                state["disk"] = ((rows ** 2 + cols ** 2) <= (self.radius * max(height, width)) ** 2).to(stacked.dtype)
        inside = (stacked * state["disk"]).flatten(1).sum(1) / stacked.flatten(1).sum(1).clamp(min=1e-12)
        return (1.0 - inside).mean()

    def to_dict(self) -> dict:
        return {"loss": "focus", "words": self.targets, "radius": self.radius, "weight": self.weight}


def loss_from_dict(record: Mapping) -> Loss:
    """The loss a :meth:`Loss.to_dict` record describes (manifests, PNG metadata)."""
    kind = record.get("loss")
    weight = record.get("weight", 1.0)
    if kind == "excite":
        return Excite(record["words"], weight)
    if kind == "bind":
        return Bind(record["pairs"], weight)
    if kind == "layout":
        return Layout({k: tuple(v) for k, v in record["boxes"].items()}, weight)
    if kind == "focus":
        return Focus(record["words"], record.get("radius", 0.35), weight)
    raise GuidanceError(f"unknown guidance loss {kind!r}; known: excite, bind, layout, focus")


__all__ = ["Bind", "Box", "Excite", "Focus", "GuidanceError", "Layout", "Loss", "loss_from_dict"]

"""Procedural scenes with exact ground truth for every object word.

Why: a toolkit about what cross-attention *means* needs a world where we know
which pixels each word refers to.  Every scene is a pure function of its seed:
flat-coloured shapes on white, a template caption, and one boolean mask per
object, tied to the caption words that name it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import numpy as np

SIZE = 64
BACKGROUND = (255, 255, 255)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple(product(COLORS, SHAPES))
# Never drawn in training, alone or in a pair: each colour and each shape keeps
# other partners, so held-out captions test composition, not memory.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square")}
)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)

# Seeds of evaluation scenes live far away from the training seed stream.
EVAL_SEED_BASE = 10_000_000


@dataclass
class SceneObject:
    color: str
    shape: str
    mask: np.ndarray  # [64, 64] bool
    center: tuple[float, float]  # (y, x) pixels
    size: float  # half extent in pixels


@dataclass
class Scene:
    image: np.ndarray  # [64, 64, 3] uint8
    caption: str
    objects: list[SceneObject]
    mention_order: list[int] = field(default_factory=list)  # object index per mention

    @property
    def words(self) -> list[str]:
        return self.caption.split()

    def word_masks(self) -> list[tuple[int, str, np.ndarray]]:
        """(word index in caption, word, its object's mask) for each object word.

        With CLIP's tokenizer every world word is one token, so the token slot
        is ``word index + 1`` (slot 0 is <|startoftext|>).
        """
        out = []
        words = self.words
        mention = 0
        i = 0
        while i < len(words):
            if words[i] in COLORS and i + 1 < len(words) and words[i + 1] in SHAPES:
                obj = self.objects[self.mention_order[mention]]
                out.append((i, words[i], obj.mask))
                out.append((i + 1, words[i + 1], obj.mask))
                mention += 1
                i += 2
            else:
                i += 1
        return out


def shape_mask(shape: str, cy: float, cx: float, s: float, size: int = SIZE) -> np.ndarray:
    """Boolean mask of one shape with half extent ``s`` centred at (cy, cx)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= s * s
    if shape == "square":
        return (np.abs(yy - cy) <= s) & (np.abs(xx - cx) <= s)
    if shape == "triangle":  # upright isosceles, apex on top
        top, bottom = cy - s, cy + s
        frac = (yy - top) / (2 * s)  # 0 at apex, 1 at base
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= frac * s * 1.1)
    raise ValueError(f"unknown shape {shape!r}")


def caption_for(objs: list[tuple[str, str]]) -> str:
    return " and ".join(f"a {c} {s}" for c, s in objs)


def _place(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """Centres and half sizes for n objects whose boxes keep a 2 px gap."""
    for _ in range(1000):
        boxes = []
        for _ in range(n):
            s = float(rng.uniform(9.0, 13.0) if n == 1 else rng.uniform(8.0, 11.0))
            cy = float(rng.uniform(s + 2, SIZE - s - 2))
            cx = float(rng.uniform(s + 2, SIZE - s - 2))
            boxes.append((cy, cx, s))
        if n == 1:
            return boxes
        (y0, x0, s0), (y1, x1, s1) = boxes
        if abs(y0 - y1) > s0 + s1 + 2 or abs(x0 - x1) > s0 + s1 + 2:
            return boxes
    raise RuntimeError("could not place objects")  # pragma: no cover


def render(objs: list[tuple[str, str]], rng: np.random.Generator) -> tuple[np.ndarray, list[SceneObject]]:
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    placed = []
    for (color, shape), (cy, cx, s) in zip(objs, _place(rng, len(objs))):
        mask = shape_mask(shape, cy, cx, s)
        image[mask] = COLORS[color]
        placed.append(SceneObject(color, shape, mask, (cy, cx), s))
    return image, placed


def pick_objects(rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str]]:
    """Choose n (colour, shape) pairs with distinct colours.

    split="train": only TRAIN_COMBOS, uniform over combos (class balanced).
    split="heldout": the first object is a HELD_OUT combo; a partner may be any
    combo of another colour.  split="any": all combos.
    """
    if split == "train":
        pool = list(TRAIN_COMBOS)
    elif split in ("heldout", "any"):
        pool = list(ALL_COMBOS)
    else:
        raise ValueError(split)
    if split == "heldout":
        held = sorted(HELD_OUT)
        first = held[int(rng.integers(len(held)))]
    else:
        first = pool[int(rng.integers(len(pool)))]
    objs = [first]
    while len(objs) < n:
        cand = pool[int(rng.integers(len(pool)))]
        if cand[0] not in {c for c, _ in objs}:
            objs.append(cand)
    return objs


def make_scene(seed: int, n_objects: int | None = None, split: str = "train",
               objects: list[tuple[str, str]] | None = None) -> Scene:
    """The scene for ``seed``: same seed, same pixels, caption and masks.

    ``objects`` fixes the (colour, shape) list; otherwise it is drawn from
    ``split``.  Mention order in two-object captions is random.
    """
    rng = np.random.default_rng(seed)
    if objects is None:
        n = n_objects if n_objects is not None else int(rng.integers(1, 3))
        objects = pick_objects(rng, n, split)
    image, placed = render(list(objects), rng)
    order = list(range(len(placed)))
    if len(order) > 1 and rng.random() < 0.5:
        order = order[::-1]
    caption = caption_for([(placed[i].color, placed[i].shape) for i in order])
    return Scene(image, caption, placed, order)


def heldout_prompts(n_single: int = 3, n_pair: int = 8) -> tuple[list[str], list[str]]:
    """Fixed held-out captions: every HELD_OUT combo alone, and pairs with one."""
    singles = [caption_for([c]) for c in sorted(HELD_OUT)][:n_single]
    rng = np.random.default_rng(EVAL_SEED_BASE)
    pairs: list[str] = []
    held = sorted(HELD_OUT)
    k = 0
    while len(pairs) < n_pair:
        first = held[k % len(held)]
        k += 1
        others = [c for c in ALL_COMBOS if c[0] != first[0]]
        second = others[int(rng.integers(len(others)))]
        objs = [first, second] if rng.random() < 0.5 else [second, first]
        cap = caption_for(objs)
        if cap not in pairs:
            pairs.append(cap)
    return singles, pairs


def heldout_scenes(n: int, n_objects: int = 2) -> list[Scene]:
    """Ground-truth held-out scenes with fixed seeds (for localisation scores)."""
    return [make_scene(EVAL_SEED_BASE + 1000 + i, n_objects=n_objects, split="heldout")
            for i in range(n)]

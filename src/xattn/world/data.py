"""Batches for training: scenes -> tensors, token slots and grounding targets.

Why a separate module: the training script, the evaluation and the tests all
need the same mapping from a scene's words to token slots and mask targets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import COLORS, SHAPES, Scene

MAX_TOKENS = 77


def image_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [b, 64, 64, 3] -> float [b, 3, 64, 64] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float [b, 3, h, w] in [-1, 1] -> uint8 [b, h, w, 3]."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def mask_fraction(mask: np.ndarray, res: int) -> np.ndarray:
    """Area fraction of a [64, 64] bool mask on a res x res grid."""
    k = mask.shape[0] // res
    return mask.reshape(res, k, res, k).mean(axis=(1, 3)).astype(np.float32)


def object_slots(scene: Scene) -> list[tuple[int, int]]:
    """Token slots (colour, shape) of each object, in object order; -1 if unnamed."""
    slots = [(-1, -1)] * len(scene.objects)
    words = scene.words
    mention = 0
    for i in range(len(words) - 1):
        if words[i] in COLORS and words[i + 1] in SHAPES:
            slots[scene.mention_order[mention]] = (i + 1, i + 2)  # +1 for <|startoftext|>
            mention += 1
    return slots


def grounding_targets(masks16: torch.Tensor, slots: torch.Tensor,
                      resolutions=(16, 8, 4)) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Soft per-token targets at each resolution.

    masks16: [b, k, 16, 16] area fractions of up to k objects.
    slots: [b, k, 2] token slots (colour, shape), -1 where absent.
    Returns ({pixels: [b, 77, pixels]}, valid [b, 77]).
    """
    b, k = masks16.shape[:2]
    valid = torch.zeros(b, MAX_TOKENS)
    targets = {}
    for res in resolutions:
        m = F.adaptive_avg_pool2d(masks16.reshape(b * k, 1, 16, 16), res).reshape(b, k, res * res)
        g = torch.zeros(b, MAX_TOKENS, res * res)
        for obj in range(k):
            for which in range(2):
                s = slots[:, obj, which]
                ok = s >= 0
                idx = torch.nonzero(ok).squeeze(1)
                g[idx, s[ok]] = m[idx, obj]
                valid[idx, s[ok]] = 1.0
        targets[res * res] = g
    return targets, valid

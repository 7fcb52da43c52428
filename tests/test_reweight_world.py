"""Reweighting on the shapes-world model: down-weighting a colour word removes that colour.

Effect tests of the issue, measured with the world's rule-based colour
segmenter (no learned judge). They need the shipped model in
``src/xattn/world/model/``; each run is 16 seeds batched in one pipeline call.
Printed figures (``pytest -s``) are the ones docs/reweighting.md reports.
"""

from __future__ import annotations

import numpy as np
import pytest

from xattn import runner
from xattn.reweight import Reweight
from xattn.session import hooks
from xattn.world import segment

pytestmark = pytest.mark.slow

SEEDS = list(range(16))
# (prompt, colour word swept): training combinations only, the swept colour named first or second.
PROMPTS = [
    ("a red circle and a blue triangle", "red"),
    ("a green square and a yellow circle", "green"),
    ("a yellow triangle and a blue circle", "blue"),
]
SCALE_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
BIAS_WEIGHTS = (0.1, 0.3, 1.0)
NEGATIVE = -1.0
EARLY_WINDOW = "0:0.3"
# Same seeds in every cell, so noise is shared; this slack only absorbs a pixel or two of jitter.
SLACK = 0.02


@pytest.fixture(scope="module")
def world(world_pipe, world_settings):
    pipe, settings = world_pipe, world_settings

    def images(prompt: str, controller=None) -> np.ndarray:
        """uint8 [seeds, h, w, 3] for ``prompt`` under ``controller`` (None: plain)."""
        controllers = [controller] if controller is not None else []
        with hooks(pipe, *controllers):
            pictures = runner.generate(pipe, prompt, seed=SEEDS[0], num_images_per_prompt=len(SEEDS), **settings)
        return np.stack([np.asarray(p.convert("RGB")) for p in pictures])

    return images


@pytest.fixture(scope="module")
def runs(world):
    """{(prompt, mode, weight, window): images}, plus the plain images under weight 1."""
    out = {}
    for prompt, word in PROMPTS:
        plain = world(prompt)
        out[(prompt, "scale", 1.0, None)] = out[(prompt, "bias", 1.0, None)] = plain
        for weight in (*SCALE_WEIGHTS, NEGATIVE):
            if weight != 1.0:
                out[(prompt, "scale", weight, None)] = world(prompt, Reweight({word: weight}, mode="scale"))
        for weight in BIAS_WEIGHTS:
            if weight != 1.0:
                out[(prompt, "bias", weight, None)] = world(prompt, Reweight({word: weight}, mode="bias"))
        out[(prompt, "scale", 0.0, EARLY_WINDOW)] = world(prompt, Reweight({word: 0.0}, steps=EARLY_WINDOW))
    return out


def share(images: np.ndarray, colour: str) -> float:
    """Mean over images of the fraction of pixels the segmenter calls ``colour``."""
    return float(np.mean([segment(image, colour).mean() for image in images]))


def pooled_shares(runs, mode: str, weights) -> dict[float, float]:
    """Mean share of the swept colour over prompts and seeds, per weight."""
    return {w: float(np.mean([share(runs[(p, mode, w, None)], word) for p, word in PROMPTS])) for w in weights}


def test_the_plain_images_show_the_colour(runs):
    for prompt, word in PROMPTS:
        assert share(runs[(prompt, "scale", 1.0, None)], word) > 0.01, prompt


def test_scale_mode_share_does_not_decrease_with_weight_and_zero_removes_half(runs):
    shares = pooled_shares(runs, "scale", (NEGATIVE, *SCALE_WEIGHTS))
    print("scale mode, mean colour share:", {w: round(s, 4) for w, s in shares.items()})
    base = shares[1.0]
    for low, high in zip(SCALE_WEIGHTS, SCALE_WEIGHTS[1:]):
        assert shares[low] <= shares[high] + SLACK * base, (low, high, shares)
    assert shares[0.0] <= 0.5 * base, shares
    assert shares[NEGATIVE] <= 0.5 * base, shares


def test_bias_mode_share_does_not_decrease_with_weight(runs):
    shares = pooled_shares(runs, "bias", BIAS_WEIGHTS)
    print("bias mode, mean colour share:", {w: round(s, 4) for w, s in shares.items()})
    for low, high in zip(BIAS_WEIGHTS, BIAS_WEIGHTS[1:]):
        assert shares[low] <= shares[high] + SLACK * shares[1.0], (low, high, shares)
    assert shares[0.1] < shares[1.0], shares


def test_an_early_window_changes_the_image_less_than_every_step(runs):
    def change(window) -> float:
        return float(np.mean([np.abs(runs[(p, "scale", 0.0, window)].astype(np.int16)
                                     - runs[(p, "scale", 1.0, None)].astype(np.int16)).mean() for p, _ in PROMPTS]))

    early, full = change(EARLY_WINDOW), change(None)
    print(f"mean |pixel change| from weight 0: steps {EARLY_WINDOW}: {early:.2f}, every step: {full:.2f}")
    assert early < full

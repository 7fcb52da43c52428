"""What "weight w on token j" means: the three reweighting modes.

Tools disagree on the meaning of a prompt weight, so xattn names each meaning
and lets them be compared side by side (P is the post-softmax attention map,
S the pre-softmax logits, e the text embedding; i a pixel, j a token slot):

``scale``
    ``P'[i, j] = w_j * P[i, j]``, rows are *not* renormalised, so ``w < 0``
    pushes the word's value vector away. This is prompt-to-prompt's attention
    equalizer (Hertz et al. 2022, ``AttentionReweight``) and bloc97's
    CrossAttentionControl. Fused: the ``value_scale`` point scales V's rows.
``bias``
    ``P' = softmax(S + log w)``, i.e. multiply by ``w`` and renormalise, so
    every row stays a distribution; needs ``w > 0``. Fused: the
    ``logit_bias`` point becomes SDPA's float mask.
``embedding``
    ``e'_j = w_j * e_j``, then each row of the text batch is rescaled so its
    mean equals the old mean. This is AUTOMATIC1111's "emphasis" (the
    ``Original`` emphasis of its webui), kept for comparison; it runs at the
    ``context`` point, which gives every cross-attention site the same
    embeddings, so it equals doing it once after the text encoder. (A1111
    takes the mean over its whole batch tensor; xattn per row, so untouched
    rows such as the unconditional one stay exactly as they were.)

None of the three materialises the attention map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import XattnError
from ..validate import OptionError, number as float32_number


# Embedding mode refuses rows whose mean is below this fraction of their mean absolute value.
MEAN_TOLERANCE = 1e-4


class ReweightError(XattnError, ValueError):
    """A weight, mode or option that the reweighting controller refuses."""


@dataclass(frozen=True)
class Mode:
    """One named meaning of a token weight."""

    name: str
    point: str  # the hook point it runs at
    meaning: str  # one line, for help texts and manifests
    allows_negative: bool
    allows_zero: bool


MODES: dict[str, Mode] = {
    "scale": Mode("scale", "value_scale", "multiply post-softmax attention by w, no renormalisation (prompt-to-prompt)",
                  allows_negative=True, allows_zero=True),
    "bias": Mode("bias", "logit_bias", "add log w to the pre-softmax logits: multiply by w and renormalise",
                 allows_negative=False, allows_zero=False),
    "embedding": Mode("embedding", "context", "scale the token's text embedding, restore the row mean (A1111)",
                      allows_negative=True, allows_zero=True),
}


def mode_named(name: str) -> Mode:
    """The mode called ``name``; a clear error listing the modes otherwise."""
    try:
        return MODES[name]
    except KeyError:
        raise ReweightError(f"unknown reweight mode {name!r}; modes: {', '.join(MODES)}") from None


def check_weight(mode: Mode, name: str, value: object) -> float:
    """``value`` as a float if ``mode`` accepts it as the weight of ``name``; else a specific error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReweightError(f"weight of {name!r} is {value!r}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ReweightError(f"weight of {name!r} is {value!r}, not a finite number")
    try:
        float32_number(number, "weight")
    except OptionError:
        raise ReweightError(f"weight of {name!r} is {value!r}, out of float32 range (about ±3.4e38): "
                            "it would be infinite in the model") from None
    if number < 0 and not mode.allows_negative:
        raise ReweightError(f"weight of {name!r} is {value!r}: mode {mode.name!r} needs weights > 0 "
                            "(it adds log w to the logits); use mode 'scale' for negative weights")
    if number == 0 and not mode.allows_zero:
        raise ReweightError(f"weight of {name!r} is {value!r}: mode {mode.name!r} needs weights > 0 "
                            "(log 0 is -inf); use mode 'scale' to remove a word")
    return number


def emphasise(context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111-style emphasis: scale token rows of ``context`` [b, j, d] by ``weights`` [b, j], keep each row's mean.

    Rows whose weights are all 1 come back unchanged. Restoring a mean is
    only meaningful when the mean is not ~0 next to the values themselves
    (a text encoder whose final layer norm has no bias gives exactly such
    rows); then this raises instead of multiplying by a ratio of two
    rounding errors.
    """
    dtype = context.dtype
    if dtype in (torch.float16, torch.bfloat16):  # means of half tensors lose digits
        context, weights = context.float(), weights.float()
    original_mean = context.mean(dim=(1, 2), keepdim=True)  # [b, 1, 1]
    scaled = context * weights[:, :, None]
    new_mean = scaled.mean(dim=(1, 2), keepdim=True)
    changed = (weights != 1).any(dim=1)  # [b]
    magnitude = context.abs().mean(dim=(1, 2), keepdim=True)
    tiny = (original_mean.abs() < MEAN_TOLERANCE * magnitude) | (new_mean.abs() < MEAN_TOLERANCE * magnitude)
    if (tiny.flatten() & changed).any():
        raise ReweightError(
            "embedding mode: this model's text embeddings average to about 0 (the mean is under "
            f"{MEAN_TOLERANCE:g} of the mean magnitude), so A1111's mean restoration is undefined here; "
            "use mode 'scale' or 'bias'"
        )
    ratio = torch.where(changed[:, None, None], original_mean / new_mean, torch.ones_like(new_mean))
    return (scaled * ratio).to(dtype)

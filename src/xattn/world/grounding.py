"""Training-time cross-attention supervision (TokenCompose-style grounding).

Why: plain diffusion training of a tiny causal text encoder smears every word
over the end/padding tokens, so all word maps look alike.  Pushing each
colour/shape token's attention inside its object's mask makes the maps mean
something.  This is *supervised* attention: the shapes-world maps are not
evidence about how Stable Diffusion itself attends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ProbeStore:
    """Collects differentiable cross-attention probabilities per forward pass."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []  # each [b, heads, pixels, tokens]
        self.enabled = True

    def clear(self) -> None:
        self.probs = []

    def close(self) -> None:
        """End the xattn session that fills the store (the stock processors come back)."""
        session = getattr(self, "session", None)
        if session is not None:
            session.__exit__(None, None, None)
            self.session = None


def install(unet) -> ProbeStore:
    """Keep every cross-attention map of ``unet``'s calls in a store, with gradients, through an xattn hook.

    A ``probs`` hook sees the map inside the autograd graph (``tests/test_world_hook_gradients.py``
    checks the gradients against float64 autograd), so training reads its maps
    the way users read theirs. The session stays open for the training run;
    :meth:`ProbeStore.close` ends it.
    """
    from ..hookpoints import Hook
    from ..session import hooks

    store = ProbeStore()

    def keep(probs, ctx):  # probs: [b, heads, pixels, tokens]
        if store.enabled:
            store.probs.append(probs)

    store.session = hooks(unet, Hook("probs", keep, selector="kind=cross"))
    store.session.__enter__()
    return store


def grounding_loss(probs_list: list[torch.Tensor], targets: dict[int, torch.Tensor],
                   valid: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Share and pixel-BCE terms averaged over supervised layers.

    probs_list: [b, h, i, j] per layer.  targets[i]: [b, j, i] soft masks at
    the layer's pixel count i (zero rows for tokens without an object).
    valid: [b, j] 1 where token j names an object.
    share: (1 - attention mass inside the mask / total mass)^2 per token.
    bce: per-pixel BCE of the token's probability against the mask.
    """
    shares, bces = [], []
    denom = valid.sum().clamp(min=1.0)
    for probs in probs_list:
        n = probs.shape[2]
        if n not in targets:
            continue
        g = targets[n]  # [b, j, i]
        a = probs.mean(dim=1).transpose(1, 2)[:, : g.shape[1]]  # [b, j, i]; a joint map's extra text columns dropped
        inside = (a * g).sum(-1) / (a.sum(-1) + eps)  # [b, j]
        shares.append((((1 - inside) ** 2) * valid).sum() / denom)
        bce = F.binary_cross_entropy(a.clamp(eps, 1 - eps), g, reduction="none").mean(-1)  # [b, j]
        bces.append((bce * valid).sum() / denom)
    if not shares:
        zero = probs_list[0].new_zeros(())
        return zero, zero
    return torch.stack(shares).mean(), torch.stack(bces).mean()

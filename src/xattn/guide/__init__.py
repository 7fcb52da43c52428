"""Guidance: steer sampling with losses on attention maps.

- :class:`Guide`, the controller: gradient steps on the latents before the
  steps of its window (:mod:`xattn.steering` gives it the place);
- the losses: :class:`Excite` (Attend-and-Excite), :class:`Bind` (a modifier's
  map onto its noun's), :class:`Layout` (a phrase's attention inside a box),
  :class:`Focus` (one object: the words' attention inside a disk the image picks).
"""

from .controller import Guide
from .losses import Bind, Excite, Focus, GuidanceError, Layout, Loss, loss_from_dict
from .spec import guide_from_text

__all__ = ["Bind", "Excite", "Focus", "Guide", "GuidanceError", "Layout", "Loss", "guide_from_text", "loss_from_dict"]

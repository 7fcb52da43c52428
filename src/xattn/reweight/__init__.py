"""Reweight words at the attention level, under one name per meaning of "weight".

- :class:`Reweight`: the controller (``xattn.Reweight({"red": 2.0}, mode="scale")``).
- :data:`MODES`: ``scale`` (prompt-to-prompt), ``bias`` (multiply and renormalise),
  ``embedding`` (A1111), documented in :mod:`xattn.reweight.modes`.
- :class:`Ramp`: a weight that changes linearly over the step window.
"""

from .controller import Reweight
from .modes import MODES, Mode, ReweightError
from .schedule import Ramp

__all__ = ["MODES", "Mode", "Ramp", "Reweight", "ReweightError"]

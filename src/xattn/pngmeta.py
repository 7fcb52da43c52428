"""Old import path of :mod:`xattn.app.pngmeta` (``xattn.pngmeta.read_parameters`` reads a PNG's settings)."""

import sys

from .app import pngmeta as _pngmeta

sys.modules[__name__] = _pngmeta  # one module under both names

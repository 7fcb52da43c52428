"""Capture attention maps and turn them into per-word heat maps, pictures, a report and files.

- :class:`Capture` (controller.py): the controller that keeps what a selector picks;
- :class:`WordMaps` (heatmaps.py): word / phrase / token maps at the image's size;
- pictures.py: overlays, word grids, step strips, per-resolution breakdowns;
- report.py: one self-contained HTML file to explore the maps;
- export.py: maps as safetensors plus a JSON manifest, and the loader.
"""

from .controller import Capture
from .heatmaps import WordMaps
from .layers import MapLayer
from .plan import CaptureBlocksError, CaptureBudgetError

__all__ = ["Capture", "CaptureBlocksError", "CaptureBudgetError", "MapLayer", "WordMaps"]

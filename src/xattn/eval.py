"""Word maps scored against ground-truth masks; the code lives in :mod:`xattn.world.measure` (old imports)."""

from .world.measure.maps import (DEFAULT_THRESHOLDS, MIN_OBJECT_PIXELS, Summary, WordScore, WorldResult,  # noqa: F401
                                 format_table, iou, iou_sweep, mass, score_word, score_world, score_world_images,
                                 summarize)
from .world.measure.pixels import object_mask, object_words  # noqa: F401
from .world.measure.pixels import touching as _touch  # noqa: F401

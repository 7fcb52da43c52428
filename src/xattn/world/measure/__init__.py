"""Shapes-world measurement, in one place: every figure about the world is read with these rules.

- :mod:`.pixels`: captions to (colour, shape) pairs, the colour segmenter,
  object masks, the shape classifier, IoU;
- :mod:`.maps`: word maps scored against object masks (``scripts/eval_maps.py``);
- :mod:`.edits`: colour and shape swaps judged from images (``scripts/eval_edits.py``);
- :mod:`.model`: the model card's figures, through :class:`~xattn.Capture` and
  :class:`~xattn.Reweight` (``scripts/eval_world.py``).
"""

from .edits import MASK_IOU, POSITION_PX, ColourSwap, ShapeSwap, colour_swap, colour_swap_summary, shape_swap
from .maps import (DEFAULT_THRESHOLDS, MIN_OBJECT_PIXELS, Summary, WordScore, WorldResult, format_table, iou,
                   iou_sweep, mass, score_word, score_world, score_world_images, summarize)
from .model import (GenerationScores, LocalisationScores, caption_fidelity, generate, generation_scores,
                    localisation_scores, pair_captions, reweight_curve, scene_word_maps)
from .pixels import (MIN_BLOB, as_rgb, blob, centroid, classify_shape, components, dominant_color, drawn_as_named,
                     foreground, largest_component, mask_iou, object_extent, object_mask, object_words, segment,
                     touching)

__all__ = [
    "DEFAULT_THRESHOLDS", "MASK_IOU", "MIN_BLOB", "MIN_OBJECT_PIXELS", "POSITION_PX", "ColourSwap",
    "GenerationScores", "LocalisationScores", "ShapeSwap", "Summary", "WordScore", "WorldResult", "as_rgb",
    "blob", "caption_fidelity", "centroid", "classify_shape", "colour_swap", "colour_swap_summary",
    "components", "dominant_color", "drawn_as_named", "foreground", "format_table", "generate",
    "generation_scores", "iou", "iou_sweep", "largest_component", "localisation_scores", "mask_iou", "mass",
    "object_extent", "object_mask", "object_words", "pair_captions", "reweight_curve", "scene_word_maps",
    "score_word", "score_world", "score_world_images", "segment", "shape_swap", "summarize", "touching",
]

"""The shapes world: a tiny Stable Diffusion trained here, with ground truth.

Scenes are flat-coloured shapes on white with template captions; every object
word ("red", "circle") has an exact pixel mask.  The shipped model in
``model/`` loads with ``StableDiffusionPipeline.from_pretrained(model_path())``.
Its cross-attention was *supervised* during training (see grounding.py), so its
maps are a test bed for tooling, not evidence about Stable Diffusion. Every
figure about it is read from pixels and maps in :mod:`xattn.world.measure`.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .scenes import (
    ALL_COMBOS,
    COLORS,
    HELD_OUT,
    SHAPES,
    TRAIN_COMBOS,
    Scene,
    SceneObject,
    heldout_prompts,
    heldout_scenes,
    make_scene,
)
from .measure.pixels import classify_shape, mask_iou, object_extent, object_words, segment

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def model_path() -> Path:
    """Folder of the shipped diffusers pipeline (package data)."""
    path = Path(str(resources.files("xattn.world").joinpath("model")))
    if not (path / "model_index.json").is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"the shapes-world model is not in {path}; train it with "
            "scripts/train_world.py and export it there (see the model card)"
        )
    return path


__all__ = [
    "ALL_COMBOS", "COLORS", "HELD_OUT", "SHAPES", "TRAIN_COMBOS", "Scene", "SceneObject",
    "classify_shape", "heldout_prompts", "heldout_scenes", "make_scene", "mask_iou", "model_path", "object_extent",
    "object_words", "segment",
]

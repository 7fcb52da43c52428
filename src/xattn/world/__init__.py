"""The shapes world: a tiny Stable Diffusion trained here, with ground truth.

Scenes are flat-coloured shapes on white with template captions; every object
word ("red", "circle") has an exact pixel mask.  The shipped model in
``model/`` loads with ``StableDiffusionPipeline.from_pretrained(model_path())``.
``model_dit/`` is the same world drawn by a diffusion transformer with joint
attention (SD3-style, flow matching), ``model_path("dit")``.
Their cross-attention was *supervised* during training (see grounding.py), so their
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

# The embedded models: name -> (package folder, the weights file that must be there).
MODELS = {
    "unet": ("model", "unet/diffusion_pytorch_model.safetensors"),  # StableDiffusionPipeline, the default
    "dit": ("model_dit", "transformer/diffusion_pytorch_model.safetensors"),  # StableDiffusion3Pipeline
}
WEIGHTS = MODELS["unet"][1]


def model_path(name: str = "unet") -> Path:
    """Folder of a shipped diffusers pipeline (package data): ``"unet"`` (default) or ``"dit"``.

    The ``"dit"`` folder is a StableDiffusion3Pipeline without T5; load it with
    ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.
    """
    if name not in MODELS:
        raise ValueError(f"no embedded shapes-world model {name!r}; choose one of {', '.join(MODELS)}")
    folder, weights = MODELS[name]
    path = Path(str(resources.files("xattn.world").joinpath(folder)))
    if not (path / "model_index.json").is_file() or not (path / weights).is_file():
        script = "train_world.py" if name == "unet" else "train_world_dit.py"
        raise FileNotFoundError(
            f"the shapes-world {name} model is not in {path}; train it with "
            f"scripts/{script} and export it there (see the model card)"
        )
    return path


__all__ = [
    "ALL_COMBOS", "COLORS", "HELD_OUT", "MODELS", "SHAPES", "TRAIN_COMBOS", "Scene", "SceneObject",
    "classify_shape", "heldout_prompts", "heldout_scenes", "make_scene", "mask_iou", "model_path", "object_extent",
    "object_words", "segment",
]

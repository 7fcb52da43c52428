"""What a pipeline folder holds, checked before diffusers reads it.

diffusers would load a ``.bin``-only folder's pickles, fail deep inside on a
pipeline without a text encoder, or stop at a component whose code lives in
the folder; each of these becomes one named error here instead, before any
weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import XattnError

INDEX = "model_index.json"
# Components a text-to-image pipeline needs for xattn to hook its words.
TEXT_PARTS = ("tokenizer", "text_encoder")
DENOISERS = ("unet", "transformer")
_LIBRARIES = (None, "diffusers", "transformers")


class ModelError(XattnError, ValueError):
    """A pipeline folder xattn will not load: malformed, pickle-only, custom code, or not text-to-image."""


def read_index(path: Path) -> dict[str, Any]:
    """The folder's ``model_index.json`` as a dict; a named error when it is not one."""
    return read_object(Path(path) / INDEX)


def read_object(file: Path) -> dict[str, Any]:
    """A JSON file of the model folder holding an object; a named error when it does not."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"{file} cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file} must hold a JSON object, not {type(data).__name__}")
    return data


def _components(index: dict[str, Any]) -> dict[str, list]:
    """Entries naming a [library, class] pair; the others are pipeline config values (flags)."""
    return {name: value for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2}


def _is_diffusers_module(library: Any) -> bool:
    """``diffusers``, ``transformers``, or one of diffusers' pipeline modules (``stable_diffusion``)."""
    if library in _LIBRARIES:
        return True
    if not isinstance(library, str):
        return False
    import diffusers.pipelines

    return hasattr(diffusers.pipelines, library)


def check_folder(path: Path) -> dict[str, Any]:
    """Raise :class:`ModelError` unless ``path`` is a text-to-image pipeline of safetensors files.

    Returns:
        the parsed ``model_index.json``.
    """
    index = read_index(path)
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelError(f"{path / INDEX} names its pipeline class {class_name!r}: custom pipeline code, "
                         "which xattn never runs")
    components = _components(index)
    for name, value in components.items():
        if not _is_diffusers_module(value[0]):
            raise ModelError(f"{path}: component {name!r} comes from {value[0]!r}, code inside the model folder; "
                             "xattn never runs a model's own code")
    present = {name for name, value in components.items() if value[0] is not None}
    if not (set(TEXT_PARTS) <= present and present & set(DENOISERS)):
        raise ModelError(f"{path} holds a {class_name}, not a text-to-image pipeline: xattn needs a tokenizer, "
                         "a text encoder and a UNet or transformer")
    for name in sorted(present):
        folder = path / name
        if not folder.is_dir():
            continue
        files = [f.name for f in folder.iterdir()]
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pth"))]
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ModelError(f"{folder} holds only pickle weights ({pickles[0]}); xattn loads safetensors only: "
                             "convert them (save_pretrained(..., safe_serialization=True)) or pass another model")
    return index


def weight_bytes(path: Path) -> int:
    """Bytes of the folder's denoiser weights (what decides a step's cost)."""
    if Path(path).is_file():  # a single-file checkpoint: every part's weights in one file
        return Path(path).stat().st_size
    total = 0
    for name in DENOISERS:
        folder = Path(path) / name
        if folder.is_dir():
            total += sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return total


__all__ = ["ModelError", "read_index", "read_object", "check_folder", "weight_bytes"]

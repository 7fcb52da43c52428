"""Word maps on disk: ``maps.safetensors`` plus a JSON ``manifest.json``, and the loader.

The tensors are the captured layer sums as they were stored (float32 running
sums, fp16 per-step maps); the manifest says what each one is (kind,
resolution, steps, sites, calls, heads) and everything needed to read the
maps back as words: the prompts, their token maps, which rows are which
prompt and image, and the run's facts (model, scheduler, seed, versions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from ..files import OverwriteError, write_bytes_atomic, write_text_atomic
from ..hookpoints import Row
from ..tokens import TokenMap, Word
from ..versions import package_versions
from .heatmaps import WordMaps
from .layers import MapLayer

MAPS_FILE = "maps.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "xattn-maps"
FORMAT_VERSION = 1
_PACKAGES = ("xattn", "torch", "diffusers", "transformers", "safetensors")


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shaped the maps."""
    return package_versions(_PACKAGES)


def maps_manifest(maps: WordMaps, *, seed: int | list[int] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON description of ``maps``: what each tensor of ``maps.safetensors`` is, and the run's facts."""
    layers = [{"key": _key(index), "kind": layer.kind, "res": list(layer.res), "steps": list(layer.steps),
               "sites": list(layer.sites), "count": layer.count,
               "heads": None if layer.heads is None else list(layer.heads)}
              for index, layer in enumerate(maps.layers)]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prompts": maps.prompts,
        "token_maps": [None if tm is None else {**tm.to_dict(), "pieces": list(tm.pieces)} for tm in maps.token_maps],
        "rows": [{"cond": row.cond, "prompt": row.prompt, "image": row.image} for row in maps.rows],
        "columns": maps.columns,
        "others": maps.others,  # true: each cross tensor has one more column, the summed padding slots
        "image_size": list(maps.image_size),
        "num_steps": maps.num_steps,
        "steps": maps.steps,
        "sites": sorted({site for layer in maps.layers for site in layer.sites}),
        "model": maps.info.get("model"),
        "scheduler": maps.info.get("scheduler"),
        "seed": seed,
        "versions": versions(),
        "layers": layers,
        **(extra or {}),
    }


def save_maps(maps: WordMaps, folder: str | Path, *, seed: int | list[int] | None = None,
              extra: dict[str, Any] | None = None, manifest: bool = True) -> Path:
    """Write ``maps.safetensors`` and ``manifest.json`` into ``folder``; never overwrites.

    Args:
        maps: word maps from ``capture.maps()`` (or :func:`load_maps`).
        folder: where to write; created if missing.
        seed: the seed(s) of the run, recorded in the manifest.
        extra: more JSON facts to record (e.g. the CLI's settings).
        manifest: False when the caller puts :func:`maps_manifest` into a manifest
            of its own under the key ``"maps"`` (as ``xattn maps`` does).

    Returns:
        The path of ``maps.safetensors``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors_path, manifest_path = folder / MAPS_FILE, folder / MANIFEST_FILE
    for path in (tensors_path, manifest_path) if manifest else (tensors_path,):
        if path.exists():
            raise OverwriteError(f"{path} exists; maps are never overwritten, choose a new folder")
    tensors = {_key(index): layer.stored().contiguous().cpu() for index, layer in enumerate(maps.layers)}
    write_bytes_atomic(tensors_path, save(tensors, metadata={"format": FORMAT}))
    if manifest:
        write_text_atomic(manifest_path, json.dumps(maps_manifest(maps, seed=seed, extra=extra), indent=2) + "\n")
    return tensors_path


def load_maps(folder: str | Path) -> WordMaps:
    """Read maps written by :func:`save_maps` (or ``xattn maps``) back as :class:`WordMaps`."""
    folder = Path(folder)
    tensors_path, manifest_path = folder / MAPS_FILE, folder / MANIFEST_FILE
    for path in (tensors_path, manifest_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; expected a folder written by xattn's save_maps / `xattn maps`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT and isinstance(manifest.get("maps"), dict):
        manifest = manifest["maps"]  # a CLI run folder keeps the maps' manifest inside its own
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not an xattn maps manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{manifest_path} has format version {manifest['format_version']}; "
                         f"this xattn reads up to {FORMAT_VERSION}: upgrade xattn")
    tensors = load_file(str(tensors_path))
    layers = [
        MapLayer(kind=entry["kind"], res=tuple(entry["res"]), steps=tuple(entry["steps"]), sites=tuple(entry["sites"]),
                 count=int(entry["count"]), heads=None if entry["heads"] is None else tuple(entry["heads"]),
                 data=tensors[entry["key"]])
        for entry in manifest["layers"]
    ]
    return WordMaps(
        layers,
        rows=tuple(Row(bool(r["cond"]), int(r["prompt"]), int(r["image"])) for r in manifest["rows"]),
        columns=manifest["columns"],
        others=bool(manifest.get("others", False)),
        prompts=manifest["prompts"],
        token_maps=[None if d is None else restore_token_map(d) for d in manifest["token_maps"]],
        image_size=tuple(manifest["image_size"]),
        num_steps=manifest["num_steps"],
        info={"model": manifest.get("model"), "scheduler": manifest.get("scheduler"), "seed": manifest.get("seed")},
    )


def _key(index: int) -> str:
    return f"layer.{index:04d}"


def restore_token_map(saved: dict) -> TokenMap:
    """A TokenMap from its ``to_dict()`` form, without needing the tokenizer again."""
    token_map = TokenMap.__new__(TokenMap)
    token_map.prompt = saved["prompt"]
    token_map.written = saved.get("written", saved["prompt"])
    token_map.chunks = None  # a single 77-slot sequence (chunk layouts are not saved)
    token_map.cut_from = saved.get("cut_from")
    token_map.max_length = int(saved["max_length"])
    token_map.end_slot = int(saved["end_slot"])
    token_map.words = [Word(w["text"], w["start"], w["end"], tuple(w["slots"]), w["occurrence"]) for w in saved["words"]]
    token_map.cut_words = []
    token_map.pieces = list(saved.get("pieces", []))
    token_map._whole_words = tuple(saved.get("whole_words", ()))
    return token_map

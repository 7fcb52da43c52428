"""Word maps on disk: ``maps.safetensors`` plus a JSON ``manifest.json``, and the loader.

The tensors are the captured layer sums as they were stored (float32 running
sums, fp16 per-step maps); the manifest says what each one is (kind,
resolution, steps, sites, calls, heads) and everything needed to read the
maps back as words: the prompts, their token maps, which rows are which
prompt and image, and the run's facts (model, scheduler, seed, versions).

A token map is saved whole, so a loaded capture resolves words exactly as the
live one: a long prompt's 77-slot chunks (where each token landed, so every
chunk's ``<start>``), a tokenizer's start slots (T5 has none), the words that
were cut, and SD3's parts (CLIP's 77 slots, then T5's) each with its offset.
Format 2 added these; format 1 files still load (one CLIP sequence each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from ..files import OverwriteError, write_bytes_atomic, write_text_atomic
from ..hookpoints import Row
from ..prompts.chunks import ChunkLayout
from ..token_parts import PartsTokenMap
from ..tokens import TokenMap, Word
from ..versions import package_versions
from .heatmaps import WordMaps
from .layers import MapLayer

MAPS_FILE = "maps.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "xattn-maps"
FORMAT_VERSION = 2  # 2: token maps keep their chunk layout, start slots, cut words and parts
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
        "token_maps": [None if tm is None else token_map_dict(tm) for tm in maps.token_maps],
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


def token_map_dict(token_map: TokenMap | PartsTokenMap) -> dict:
    """Everything :func:`restore_token_map` needs to resolve words as ``token_map`` does (JSON)."""
    if isinstance(token_map, PartsTokenMap):
        return {"parts": [{"offset": offset, **token_map_dict(part)} for offset, part in token_map.parts]}
    chunks = token_map.chunks
    return {
        **token_map.to_dict(),
        "written": token_map.written,
        "pieces": list(token_map.pieces),
        "start_slots": int(token_map.start_slots),
        "cut_words": list(token_map.cut_words),
        "cut_from": token_map.cut_from,
        "chunks": None if chunks is None else {"slots": list(chunks.slots),
                                               "chunk_lengths": list(chunks.chunk_lengths)},
    }


def restore_token_map(saved: dict) -> TokenMap | PartsTokenMap:
    """A TokenMap (or SD3's PartsTokenMap) from :func:`token_map_dict`, without needing the tokenizer again."""
    if "parts" in saved:
        return PartsTokenMap([(int(part["offset"]), restore_token_map(part)) for part in saved["parts"]])
    token_map = TokenMap.__new__(TokenMap)
    token_map.prompt = saved["prompt"]
    token_map.written = saved.get("written", saved["prompt"])
    chunks = saved.get("chunks")  # format 1: a single 77-slot sequence
    token_map.chunks = None if chunks is None else ChunkLayout(tuple(chunks["slots"]), tuple(chunks["chunk_lengths"]))
    token_map.start_slots = int(saved.get("start_slots", 1))
    token_map.cut_from = saved.get("cut_from")
    token_map.max_length = int(saved["max_length"])
    token_map.end_slot = int(saved["end_slot"])
    token_map.words = [Word(w["text"], w["start"], w["end"], tuple(w["slots"]), w["occurrence"]) for w in saved["words"]]
    token_map.cut_words = list(saved.get("cut_words", []))
    token_map.pieces = list(saved.get("pieces", []))
    token_map._whole_words = tuple(saved.get("whole_words", ()))
    return token_map

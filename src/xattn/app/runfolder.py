"""Run folders: one new folder per run, written atomically, with a manifest.

A run never overwrites earlier work. By default it gets a new folder
``outputs/<command>-<UTC timestamp>-<slug>``; an explicit ``--out`` folder
must be new or empty (a sweep may reopen its own folder to resume). Every file
is written to a temporary name in the same folder and renamed into place, so a
killed run leaves either the old file or the new one, never half of one.

``manifest.json`` records what is needed to redo the run: the command, every
setting, the model (and Hub revision when known), package versions, timings.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import XattnError

DEFAULT_ROOT = Path("outputs")
MANIFEST = "manifest.json"
_PACKAGES = ("xattn", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow")


class RunFolderError(XattnError, FileExistsError):
    """An output folder or file that exists and must not be overwritten."""


# -- atomic writes --------------------------------------------------------------------

def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; values JSON lacks (paths) become strings."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_image_atomic(image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Save a PIL image atomically (format from the suffix; ``pnginfo=`` for PNG text chunks)."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"), **save_kwargs)
    return write_bytes_atomic(path, buffer.getvalue())


# -- folders ----------------------------------------------------------------------------

def slugify(text: str, max_length: int = 40) -> str:
    """A short file-name-safe form of ``text`` (``"a red circle!"`` -> ``a-red-circle``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-")


def default_folder_name(command: str, slug: str = "", now: datetime | None = None) -> str:
    """``<command>-<UTC YYYYmmdd-HHMMSS>-<slug>``: sorts by time, says what ran."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    tail = slugify(slug)
    return f"{command}-{stamp}" + (f"-{tail}" if tail else "")


def check_out_folder(out: str | os.PathLike, *, resume: bool = False) -> Path:
    """Raise unless ``out`` may be written: new, empty, or (``resume``) any folder.

    Raises:
        RunFolderError: ``out`` is a file, or a non-empty folder and ``resume`` is False.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} exists and is a file; pass a new folder")
    if folder.is_dir() and any(folder.iterdir()) and not resume:
        raise RunFolderError(f"--out {folder} exists and is not empty; pass a new folder")
    return folder


def create_run_folder(command: str, *, slug: str = "", out: str | os.PathLike | None = None,
                      root: str | os.PathLike = DEFAULT_ROOT, resume: bool = False) -> Path:
    """Make the folder a run writes into, never reusing finished work by accident.

    Args:
        command: the command name, first part of the default folder name.
        slug: words describing the run (e.g. the prompt), slugified into the name.
        out: exact folder to use; it must not exist or be empty unless ``resume``.
        root: where default folders go (``outputs/``).
        resume: allow an existing ``out`` (a sweep continuing its own folder).

    Raises:
        RunFolderError: ``out`` exists with files in it and ``resume`` is False.
    """
    if out is not None:
        folder = check_out_folder(out, resume=resume)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = default_folder_name(command, slug)
    for attempt in range(1, 1000):
        folder = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            folder.mkdir()  # atomic: two runs in the same second get different folders
            return folder
        except FileExistsError:
            continue
    raise RunFolderError(f"could not find a free folder name for {base} under {root}")


# -- manifest ---------------------------------------------------------------------------

def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the pixels, plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Timings:
    """Wall-clock seconds per named phase, for the manifest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)

    def as_dict(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._start, 4)}


def build_manifest(command: str, settings: dict[str, Any], *, model: dict[str, Any] | None = None,
                   timings: dict[str, float] | None = None, status: str = "finished",
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's content: what ran, with what, how long it took.

    Args:
        command: the CLI command (``generate``, ``sweep``...).
        settings: every resolved setting (after config and command-line merging).
        model: the model's identity (reference, folder, revision).
        timings: seconds per phase.
        status: ``running``, ``finished`` or ``failed``.
        extra: command-specific fields (outputs written, jobs...).
    """
    return {
        "command": command,
        "argv": sys.argv,
        "status": status,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "model": model or {},
        "versions": package_versions(),
        "timings": timings or {},
        **(extra or {}),
    }


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` in ``folder`` atomically (it is rewritten as a run progresses)."""
    return write_json_atomic(Path(folder) / MANIFEST, manifest)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of a run folder."""
    return json.loads((Path(folder) / MANIFEST).read_text())

"""Run folders: one new folder per run, written atomically, with a manifest.

A run never overwrites earlier work. By default it gets a new folder
``outputs/<command>-<UTC timestamp>-<slug>``; an explicit ``--out`` folder
must be new, empty, or hold a run that did not finish (its files are removed
first); a sweep may reopen its own folder to resume. Files are written
atomically (:mod:`xattn.files`).

``manifest.json`` records what is needed to redo the run: the command, every
setting, the model (and Hub revision when known), package versions, timings.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ..files import OverwriteError, save_image_atomic, write_json_atomic  # noqa: F401 - save_image_atomic: for commands
from ..versions import package_versions

DEFAULT_ROOT = Path("outputs")
MANIFEST = "manifest.json"
RunFolderError = OverwriteError  # an output folder or file that exists and must not be overwritten
REUSE_FLAG = "--overwrite-failed"


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


def _writable_parent(folder: Path) -> None:
    """Refuse an ``--out`` below a file, or on a folder or file system that cannot be written."""
    parent = folder
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise RunFolderError(f"--out {folder}: {parent} is a file, so no folder can be made below it")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {folder}: {parent} cannot be written (read-only or no permission)")


def _reusable(folder: Path, overwrite_failed: bool) -> list[Path]:
    """The files of an unfinished earlier run in ``folder`` that a new run may remove; raise if it may not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        status = manifest.get("status") if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        status, manifest = None, {}
    if status == "finished":
        raise RunFolderError(f"--out {folder} exists and holds a finished run, which is never overwritten; pass a new folder")
    if status not in ("failed", "running"):
        raise RunFolderError(f"--out {folder} exists and is not empty; pass a new folder")
    if status == "running" and not overwrite_failed:
        raise RunFolderError(
            f"--out {folder} holds a run whose manifest still says 'running': it is still running, or it was "
            f"killed; if no xattn is writing there, pass {REUSE_FLAG} to reuse the folder")
    listed = {MANIFEST, *(str(name) for name in manifest.get("outputs", []))}
    ours = [path for path in folder.iterdir() if path.name in listed or
            (path.name.startswith(".") and path.name.endswith(".tmp"))]
    others = sorted(path.name for path in folder.iterdir() if path not in ours)
    if others:
        raise RunFolderError(f"--out {folder} holds an unfinished run and files it did not write "
                             f"({', '.join(others[:5])}); pass a new folder")
    return ours


def check_out_folder(out: str | os.PathLike, *, resume: bool = False, overwrite_failed: bool = False) -> Path:
    """Raise unless ``out`` may be written: new, empty, an unfinished run's, or (``resume``) any folder.

    A folder whose run failed (its manifest says so) is reused: the failed
    run's own files are removed when the new run makes the folder. One whose
    manifest still says ``running`` is reused only with ``overwrite_failed``.

    Raises:
        RunFolderError: ``out`` is a file, below a file, not writable, or holds
            other work (a finished run, files no run of ours wrote).
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} exists and is a file; pass a new folder")
    _writable_parent(folder)
    if folder.is_dir() and any(folder.iterdir()) and not resume:
        _reusable(folder, overwrite_failed)
    return folder


def create_run_folder(command: str, *, slug: str = "", out: str | os.PathLike | None = None,
                      root: str | os.PathLike = DEFAULT_ROOT, resume: bool = False,
                      overwrite_failed: bool = False) -> Path:
    """Make the folder a run writes into, never reusing finished work by accident.

    Args:
        command: the command name, first part of the default folder name.
        slug: words describing the run (e.g. the prompt), slugified into the name.
        out: exact folder to use; it must not exist or be empty unless ``resume``.
        root: where default folders go (``outputs/``).
        resume: allow an existing ``out`` (a sweep continuing its own folder).
        overwrite_failed: reuse an ``out`` whose manifest says ``running`` (a killed run).

    Raises:
        RunFolderError: ``out`` exists with files in it and ``resume`` is False.
    """
    if out is not None:
        folder = check_out_folder(out, resume=resume, overwrite_failed=overwrite_failed)
        if folder.is_dir() and any(folder.iterdir()) and not resume:
            stale = _reusable(folder, overwrite_failed)
            for path in stale:
                path.unlink()
            print(f"note: reusing --out {folder}: the run that wrote it did not finish; its files were removed",
                  file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    root = Path(root)
    _writable_parent(root)
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
    """The ``manifest.json`` of a run folder.

    Raises:
        RunFolderError: there is none, or it is not a JSON object.
    """
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist; pass a run folder written by xattn") from None
    except (OSError, ValueError) as error:
        raise RunFolderError(f"{path} cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data

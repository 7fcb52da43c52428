"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file xattn writes (images, manifests, maps, reports) goes through
:func:`write_bytes_atomic`: the bytes go to a temporary file in the same
folder, are flushed to disk and renamed into place. The result gets the mode
an ordinary ``open()`` would give it (``0o666`` less the umask), not the
``0o600`` of a temporary file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import XattnError


class OverwriteError(XattnError, FileExistsError):
    """A file or folder that exists and must not be overwritten."""


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (NaN is refused); paths become strings."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")


def save_image_atomic(image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Save a PIL image atomically (format from the suffix; ``pnginfo=`` for PNG text chunks)."""
    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"), **save_kwargs)
    return write_bytes_atomic(path, buffer.getvalue())


__all__ = ["OverwriteError", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "save_image_atomic"]

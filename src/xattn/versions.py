"""Which versions made a result: Python and the packages that decide the numbers."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("xattn", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{"python": ..., name: version or None}`` for each of ``packages``."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


__all__ = ["PACKAGES", "package_versions"]

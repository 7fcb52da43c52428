"""The one error type of the edit package, so callers (and the CLI) can catch it."""

from __future__ import annotations

from ..errors import XattnError


class EditError(XattnError, ValueError):
    """An edit that cannot be done as asked: mismatched prompts, bad windows, unknown words."""


__all__ = ["EditError"]

"""A1111's extra-network tags in a prompt: ``<lora:name:weight>``.

A1111 reads these tags before anything else in the prompt: they load a LoRA
file by name from the user's LoRA folder at that strength and are not text.
This module only reads them; :func:`xattn.app.addons.apply_loras` loads them
(the CLI's ``--lora-dir``). Other networks (``<hypernet:...>``) are read too,
so that callers can refuse them by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .types import PromptSyntaxError

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:name[:weight]>`` tag, with its place in the prompt."""

    kind: str  # "lora", "hypernet", ...
    name: str
    weight: float
    start: int


def network_tags(prompt: str) -> list[NetworkTag]:
    """Every extra-network tag of ``prompt``, in order; ``<lora:name>`` has weight 1 (A1111's default).

    Raises:
        PromptSyntaxError: a weight that is not a finite number (``<lora:name:x>``).
    """
    tags = []
    for match in _TAG.finditer(prompt):
        kind, fields = match.group(1), match.group(2).split(":")
        name = fields[0].strip()
        weight = 1.0
        if len(fields) > 1 and fields[1].strip():
            try:
                weight = float(fields[1])
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise PromptSyntaxError(f"the weight of <{match.group(2)}> must be a finite number", prompt,
                                        match.start())
        tags.append(NetworkTag(kind, name, weight, match.start()))
    return tags


__all__ = ["NetworkTag", "network_tags"]

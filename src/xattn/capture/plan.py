"""What a capture will hold, known before sampling: per-site sizes and bytes.

Why: a per-step capture of a long schedule can need gigabytes. We compute the
exact number of bytes from the model's structure at the first captured call
of a run, before anything is stored or any denoising step completes, and
refuse with a clear message instead of running out of memory halfway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..errors import XattnError
from ..sites import Site


class CaptureBudgetError(XattnError, MemoryError):
    """A capture would hold more bytes than its budget allows."""


def parse_bytes(value: int | str | None) -> int | None:
    """``1_000_000``, ``"64MB"``, ``"1.5GiB"`` -> bytes; ``None`` = no limit."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"budget must be a positive number of bytes, not {value}")
        return value
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgib")
    unit = text[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in units or amount <= 0 or not math.isfinite(amount):
        raise ValueError(f"budget {value!r} is not a size; write bytes (1000000) or e.g. '64MB', '1.5GiB'")
    return int(amount * units[unit])


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def site_downsampling(denoiser: nn.Module) -> dict[str, int]:
    """How many times each site's feature map is smaller than the latent.

    Reads the UNet's own structure (which blocks downsample or upsample), so
    SD 1.x, 2.x and SDXL layouts all come out right. Empty for denoisers
    without ``down_blocks`` (their sites are treated as latent-sized).
    """
    down_blocks = getattr(denoiser, "down_blocks", None)
    if down_blocks is None:
        return {}
    prefixes: list[tuple[str, int]] = []
    factor = 1
    for index, block in enumerate(down_blocks):
        prefixes.append((f"down_blocks.{index}.", factor))
        if getattr(block, "downsamplers", None):
            factor *= 2
    prefixes.append(("mid_block.", factor))
    for index, block in enumerate(getattr(denoiser, "up_blocks", [])):
        prefixes.append((f"up_blocks.{index}.", factor))
        if getattr(block, "upsamplers", None):
            factor //= 2
    names = [key[: -len(".processor")] for key in denoiser.attn_processors]
    return {name: next((f for prefix, f in prefixes if name.startswith(prefix)), 1) for name in names}


def res_at(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """A site's (h, w) when its map is ``factor`` times smaller than the latent."""
    return math.ceil(latent_hw[0] / factor), math.ceil(latent_hw[1] / factor)


@dataclass(frozen=True)
class PlannedSite:
    site: Site
    res: tuple[int, int]
    heads_kept: int  # 1 when heads are averaged
    keys: int  # j: captured token columns (cross) or query positions (self)

    def bytes_per_call(self, rows: int, itemsize: int) -> int:
        return rows * self.heads_kept * self.res[0] * self.res[1] * self.keys * itemsize

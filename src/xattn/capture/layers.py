"""The unit a capture stores: one summed attention map with what went into it.

Aggregated capture keeps one layer per (kind, resolution) (or per site when
heads are kept); per-step capture keeps one per (step, site). Word maps,
pictures, the report and the export all read layers, so they work the same
on either mode, in memory, streamed to disk or loaded back from an export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

TEXT_KINDS = ("cross", "joint")  # sites whose maps have text keys: a joint site's image->text block is a text map

@dataclass
class MapLayer:
    """A sum of attention maps over ``count`` attention calls.

    The tensor is ``[rows, heads, i, j]``: rows are the captured batch rows
    (see :class:`WordMaps`), ``heads`` is 1 when heads were averaged, ``i``
    the ``res[0] * res[1]`` query positions and ``j`` the keys (captured token
    columns at cross and joint sites, the ``i`` positions again at self sites).
    """

    kind: Literal["cross", "self", "joint"]
    res: tuple[int, int]
    steps: tuple[int, ...]  # the denoising steps summed in; empty if unknown (bare model calls)
    sites: tuple[str, ...]  # the attention sites summed in
    count: int  # attention calls summed (the divisor of the mean)
    heads: tuple[int, ...] | None  # head indices kept separately; None = averaged over the selected heads
    data: torch.Tensor | None = None  # [rows, heads, i, j], in memory
    shard: Path | None = None  # or: a safetensors file ...
    key: str | None = None  # ... and the tensor's name in it

    def tensor(self) -> torch.Tensor:
        """The summed maps ``[rows, heads, i, j]`` as float32 on the CPU (read from disk if streamed).

        Capture keeps sums on the model's device; word maps are small, so they are made on the CPU.
        """
        if self.data is not None:
            return self.data.float().cpu()
        if self.shard is None or self.key is None:
            raise ValueError(f"layer {self.describe()} holds no data")
        with safe_open(str(self.shard), framework="pt") as handle:
            return handle.get_tensor(self.key).float()

    def stored(self) -> torch.Tensor:
        """The summed maps in the dtype they were stored in (fp16 for per-step maps)."""
        if self.data is not None:
            return self.data
        with safe_open(str(self.shard), framework="pt") as handle:
            return handle.get_tensor(self.key)

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds in memory (0 when it lives on disk)."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def describe(self) -> str:
        steps = f"steps {self.steps[0]}..{self.steps[-1]}" if self.steps else "no step"
        return f"{self.kind} {self.res[0]}x{self.res[1]} ({steps}, {len(self.sites)} site(s), {self.count} call(s))"

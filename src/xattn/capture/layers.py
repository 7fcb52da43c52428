"""The unit a capture stores: one summed attention map with what went into it.

Aggregated capture keeps one layer per (kind, resolution) (or per site when
heads are kept); per-step capture keeps one per (step, site). Word maps,
pictures, the report and the export all read layers, so they work the same
on either mode, in memory, streamed to disk or loaded back from an export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import torch
from safetensors import safe_open

TEXT_KINDS = ("cross", "joint")  # sites whose maps have text keys: a joint site's image->text block is a text map

# The four blocks of a joint site's attention (queries -> keys). The image->text block is the text map every
# capture keeps (kind "joint"); the others are kept on request (``Capture(blocks=...)``) as layers of kind
# ``"joint:<block>"``, which word maps never read.
JOINT_BLOCKS = ("image->text", "image->image", "text->image", "text->text")
BLOCK_KIND = "joint:"


def block_kind(block: str) -> str:
    """The layer kind of a joint block other than image->text: ``"joint:text->image"``."""
    return BLOCK_KIND + block

@dataclass
class MapLayer:
    """A sum of attention maps over ``count`` attention calls.

    The tensor is ``[rows, heads, i, j]``: rows are the captured batch rows
    (see :class:`WordMaps`), ``heads`` is 1 when heads were averaged, ``i``
    the ``res[0] * res[1]`` query positions and ``j`` the keys (captured token
    columns at cross and joint sites, the ``i`` positions again at self sites).
    A ``joint:<block>`` layer's ``i`` and ``j`` are its block's queries and keys
    (image positions or every text slot: ``joint:text->image`` is ``[rows, heads, text, image]``).
    """

    kind: str  # "cross", "self", "joint" (image->text), or "joint:<block>" for another joint block
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

"""What a capture will hold, known before sampling: per-site sizes and bytes.

Why: a per-step capture of a long schedule can need gigabytes. We compute the
exact number of bytes from the model's structure at the first captured call
of a run, before anything is stored or any denoising step completes, and
refuse with a clear message instead of running out of memory halfway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import XattnError
from ..hookpoints import BatchLayout, Row
from ..sites import Site
from .layers import MapLayer


class CaptureBudgetError(XattnError, MemoryError):
    """A capture would hold more bytes than its budget allows."""


class CaptureBlocksError(XattnError, ValueError):
    """Joint blocks asked of a capture that cannot keep them (unknown names, sites that are not joint)."""


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
    queries: int | None = None  # i, when not the res[0] * res[1] image positions (a joint block's text queries)
    kind: str | None = None  # the layer kind when not the site's ("joint:text->image"...)

    def bytes_per_call(self, rows: int, itemsize: int) -> int:
        queries = self.res[0] * self.res[1] if self.queries is None else self.queries
        return rows * self.heads_kept * queries * self.keys * itemsize


def token_columns(layout: BatchLayout, key_length: int, tokens: tuple | None,
                  slots: str = "prompt") -> tuple[list[int] | None, bool]:
    """Token slots a capture keeps at cross sites, and whether one more column sums the padding after them.

    With ``tokens`` (a selector's words and slot indices): the slots they name
    in every prompt of the call. Otherwise, with ``slots="prompt"``: slot 0 (the
    start token) up to the longest prompt's end token, then one column with the
    padding after it summed; every slot (None) with ``slots="all"``, when the
    prompts are unknown (bare model calls) or when they fill the sequence.
    """
    if tokens is None:
        if slots == "all":
            return None, False
        try:
            last = max(layout.token_map(p).end_slot for p in range(layout.num_prompts))
        except (LookupError, ValueError):  # prompts unknown: nothing says which slots matter
            return None, False
        if last + 2 >= key_length:  # a padding column would save nothing
            return None, False
        return list(range(last + 1)), True
    chosen: set[int] = set()
    for prompt in range(layout.num_prompts):
        for token in tokens:
            chosen.update([token] if isinstance(token, int) else layout.token_map(prompt).indices(token))
    bad = sorted(s for s in chosen if s >= key_length)
    if bad:
        raise ValueError(f"token slots {bad} are outside this model's {key_length} text positions")
    return sorted(chosen), False


class Slice:
    """Which indices of one dimension to keep: everything, a contiguous run (a view), or a list."""

    def __init__(self, indices: list[int] | None, size: int):
        self.count = size if indices is None else len(indices)
        self.span: tuple[int, int] | None = None
        self.index: torch.Tensor | None = None
        self._on_device: dict[torch.device, torch.Tensor] = {}
        if indices is None or indices == list(range(size)):
            return
        if indices == list(range(indices[0], indices[0] + len(indices))):
            self.span = (indices[0], len(indices))
        else:
            self.index = torch.tensor(indices, dtype=torch.long)

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.span is not None:
            return x.narrow(dim, *self.span)
        if self.index is None:
            return x
        index = self._on_device.get(x.device)
        if index is None:
            index = self._on_device[x.device] = self.index.to(x.device)
        return x.index_select(dim, index)


class RowPart:
    """The rows one kind of call hands a capture, and where they sit in its store.

    A pipeline that batches classifier-free guidance hands every row in each
    call: one part. Flux's true CFG calls the transformer twice a step, on the
    prompts' rows and on the negative prompts' rows: with ``uncond=True`` each
    call is a part, and its rows go to their own rows of the same sums.
    """

    def __init__(self, layout: BatchLayout, indices: list[int], counts: bool = True):
        self.row_indices = list(indices)  # which rows of the call are kept
        self.rows: tuple[Row, ...] = tuple(layout.rows[r] for r in indices)
        self.batch_size = layout.batch_size
        self.choice = Slice(self.row_indices, layout.batch_size)
        self.start = 0  # first row of the store this part writes
        self.whole = True  # the part fills every row of the store (then no narrowing)
        self.counts = counts  # its calls are the ones counted (one per attention call of a batched pipeline)

    def matches(self, layout: BatchLayout) -> bool:
        return (layout.batch_size == self.batch_size
                and tuple(layout.rows[r] for r in self.row_indices) == self.rows)

    def of(self, data: torch.Tensor) -> torch.Tensor:
        """This part's rows of a stored ``[rows, ...]`` tensor (a view)."""
        return data if self.whole else data.narrow(0, self.start, len(self.rows))


class RunState:
    """What a capture holds for one pipeline call: rows, token columns, sizes, and its sums."""

    def __init__(self, layout: BatchLayout, rows: list[int], columns: list[int] | None, key_length: int,
                 latent_hw: tuple[int, int], image_hw: tuple[int, int], num_steps: int | None,
                 others: bool = False):
        self.layout = layout  # the layout of the last call seen
        self.parts = [RowPart(layout, rows)]
        self.part = self.parts[0]  # the part of the last call seen
        self.columns = columns  # token slots kept at cross and joint sites (None = all)
        self.key_length = key_length
        self.column_choice = Slice(columns, key_length)
        self.others = others  # one more column: the summed attention on every slot after ``columns`` (padding)
        self.latent_hw = latent_hw
        self.patch = 1  # how many latent pixels one map position spans at sites without a UNet factor
        self.image_hw = image_hw
        self.num_steps = num_steps
        self.first_step: int | None = None  # the step of the first captured call
        self.layers: dict[tuple, MapLayer] = {}
        self.sites: dict[tuple, set[str]] = {}
        self.steps: dict[tuple, set[int]] = {}
        self.planned_bytes = 0
        self.streaming_step: int | None = None
        self.shards: list[Path] = []

    @property
    def rows(self) -> tuple[Row, ...]:
        """What each stored row is, in store order (the parts one after another)."""
        return tuple(row for part in self.parts for row in part.rows)

    def add_part(self, part: RowPart, first: bool) -> None:
        """Store ``part``'s rows too (before the others when ``first``): every sum gets zero rows for it."""
        self.parts.insert(0 if first else len(self.parts), part)
        start = 0
        for each in self.parts:
            each.start, each.whole = start, False
            start += len(each.rows)
        held_from = len(part.rows) if first else 0  # the rows held so far stay together, after or before it
        for layer in self.layers.values():
            if layer.data is None:
                raise RuntimeError("a capture's rows grew after its maps were streamed to disk")
            grown = torch.zeros((start, *layer.data.shape[1:]), dtype=layer.data.dtype, device=layer.data.device)
            grown.narrow(0, held_from, layer.data.shape[0]).copy_(layer.data)
            layer.data = grown

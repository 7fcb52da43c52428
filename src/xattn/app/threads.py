"""How many CPU threads torch samples with.

A model of a few megabytes does too little work per operation to gain from
threads: the embedded 64x64 model ran 10-30x faster with one torch thread than
with two on a busy machine. So small models on the CPU get one thread, others
torch's default, and ``--threads`` overrides both. The count is recorded in
the manifest, because CPU results can differ by one level at a pixel between
thread counts (GEMMs split differently).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .modelfolder import weight_bytes

SMALL_MODEL_BYTES = 200 * 10**6  # below this a denoiser runs fastest on one CPU thread
TORCH_DEFAULT = torch.get_num_threads()  # before any run changed it


def choose_threads(model_path: Path, device: torch.device, requested: int | None = None) -> int:
    """The thread count to sample with: ``requested``, else 1 for a small model on the CPU, else torch's."""
    if requested is not None:
        return int(requested)
    if device.type == "cpu" and weight_bytes(model_path) < SMALL_MODEL_BYTES:
        return 1
    return TORCH_DEFAULT


def apply_threads(count: int) -> int:
    """Set torch's intra-op thread count; returns it."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


__all__ = ["SMALL_MODEL_BYTES", "choose_threads", "apply_threads"]

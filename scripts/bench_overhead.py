"""Per-step cost of xattn against diffusers' stock SDPA processor, on an SD 1.5-size UNet.

Builds the SD 1.5 UNet architecture from its public config (block_out_channels
320/640/1280/1280, cross_attention_dim 768, 8 heads) with random weights and
times one UNet step (a classifier-free-guidance batch of 2) for each variant.
Variants run interleaved, round after round, and the table reports medians
and each median as a ratio to stock measured in the same run, so slow drift
of the machine cancels out.

    python scripts/bench_overhead.py                      # CPU, 256x256, fp32
    python scripts/bench_overhead.py --device cuda        # 512x512, fp16
    python scripts/bench_overhead.py --edit               # a prompt-to-prompt batch (source + target)
    python scripts/bench_overhead.py --model flux --threads 2   # Flux.1-width transformer, 512^2 and 1024^2
    python scripts/bench_overhead.py --model sd3 --quick        # a smoke run of the SD3 table (tiny width)

Run it on an otherwise idle machine; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

import xattn
from bench_joint import RATIO_HEADER, ratio_cells, timed_rounds  # next to this script
from xattn.hookpoints import BatchLayout, Row

# variant name -> factory of a context manager that sets the UNet up for it
Variant = Callable[[UNet2DConditionModel, dict], contextlib.AbstractContextManager]


def sd15_unet() -> UNet2DConditionModel:
    """The SD 1.5 UNet architecture (public config), random weights."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )


@contextlib.contextmanager
def stock(unet, setup) -> Iterator[None]:
    original = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield
    finally:
        unet.set_attn_processor(original)


class session_with:
    """A variant running the given controllers; each is built once and reused every round."""

    def __init__(self, *make_controllers: Callable[[dict], xattn.Controller]):
        self.make_controllers = make_controllers
        self.controllers: list[xattn.Controller] = []

    def __call__(self, unet, setup):
        if not self.controllers:
            self.controllers = [make(setup) for make in self.make_controllers]
        return xattn.hooks(unet, *self.controllers, scheduler=setup["scheduler"], layout=setup["layout"])

    def bytes_held(self) -> str:
        sizes = [c.bytes_held() for c in self.controllers if hasattr(c, "bytes_held")]
        return str(sum(sizes)) if sizes else "-"


def observe_probs(setup):
    return xattn.Hook("probs", lambda p, ctx: None, selector="kind=cross")


def fused_scale(setup):
    weights = setup["token_weights"]
    return xattn.Hook("value_scale", lambda x, ctx: x * weights, selector="kind=cross")


def fused_bias(setup):
    bias = setup["token_weights"].log()
    return xattn.Hook("logit_bias", lambda x, ctx: x + bias, selector="kind=cross")


VARIANTS: dict[str, Variant] = {
    "stock AttnProcessor2_0": stock,
    "xattn, no hooks": session_with(),
    "xattn, observe probs (all cross)": session_with(observe_probs),
    "xattn, fused reweight (value_scale)": session_with(fused_scale),
    "xattn, fused reweight (logit_bias)": session_with(fused_bias),
}


def optional_variants() -> dict[str, Variant]:
    """Variants of features that may not be installed in this checkout."""
    extra: dict[str, Variant] = {}
    if hasattr(xattn, "Capture"):
        extra["capture, aggregated (all cross, every step)"] = session_with(lambda s: xattn.Capture())
        extra["capture, per-step fp16 (budget 1 GiB)"] = session_with(
            lambda s: xattn.Capture(per_step=True, budget="1GiB"))
    if hasattr(xattn, "Reweight"):
        extra["Reweight('scale') controller"] = session_with(lambda s: xattn.Reweight({5: 0.5}, mode="scale"))
        extra["Reweight('bias') controller"] = session_with(lambda s: xattn.Reweight({5: 0.5}, mode="bias"))
    return extra


def edit_variants() -> tuple[BatchLayout, dict[str, Variant]]:
    """Stock vs a word-swap edit (cross replace over 0:0.8, self injection at <=32 over 0:0.4).

    The same edit is also run with the self-attention maps made explicit and
    copied, as prompt-to-prompt implementations do, to show what the fused
    ``map_rows`` injection saves.
    """
    from transformers import CLIPTokenizer

    from xattn.assets import clip_tokenizer_path
    from xattn.edit import Replace, SelfInject, edit_layout

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_path())
    layout = edit_layout(tokenizer, "a red circle and a blue square", ["a green circle and a blue square"])
    from xattn.edit.pairs import row_pairs

    pairs = row_pairs(layout)

    def copy_source_map(probs, ctx):  # prompt-to-prompt's way: materialise the self map, copy the source rows
        probs[pairs.target] = probs[pairs.source]
        return probs

    return layout, {
        "stock AttnProcessor2_0": stock,
        "edit: Replace 0:0.8 + SelfInject 0:0.4 res<=32": session_with(
            lambda s: Replace(steps="0:0.8"), lambda s: SelfInject(steps="0:0.4", res="<=32")),
        "same edit, self maps copied explicitly (prompt-to-prompt's way)": session_with(
            lambda s: Replace(steps="0:0.8"),
            lambda s: xattn.Hook("probs", copy_source_map, selector="kind=self res=<=32 steps=0:0.4")),
    }


class PeakMemory:
    """Peak memory one step adds above what was in use just before it, in bytes.

    CUDA: the allocator's own peak counter. CPU (Linux only): the process's
    resident high-water mark, reset through ``/proc/self/clear_refs`` just
    before the step. glibc is told to serve every allocation over 256 KiB
    with its own mapping, so a freed tensor leaves the resident set at once
    and the figure follows live tensors rather than the allocator's cache.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.available = self.cuda or Path("/proc/self/clear_refs").exists()
        self.libc = None
        if not self.cuda and self.available:
            self.libc = ctypes.CDLL(ctypes.util.find_library("c"))
            M_MMAP_THRESHOLD = -3
            self.libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)

    @staticmethod
    def _status_bytes(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
        raise RuntimeError(f"/proc/self/status has no {field}")

    def measure(self, run: Callable[[], object]) -> int | None:
        if not self.available:
            return None
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        self.libc.malloc_trim(0)
        before = self._status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resident high-water mark := resident now
        run()
        return self._status_bytes("VmHWM") - before


class _FixedSchedule:
    """Stands in for a scheduler: the step clock reads ``timesteps``."""

    def __init__(self, timesteps: torch.Tensor):
        self.timesteps = timesteps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default 256 on CPU, 512 on CUDA)")
    parser.add_argument("--dtype", default=None, help="float32 / float16 (default fp32 on CPU, fp16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each runs every variant once)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all)")
    parser.add_argument("--only", default=None, help="comma list of substrings: run matching variants only (stock always; the edit batch only if named)")
    parser.add_argument("--edit", action="store_true",
                        help="time a prompt-to-prompt edit batch (source + target, guidance) against stock")
    parser.add_argument("--model", choices=("sd15", "flux", "sd3"), default="sd15",
                        help="sd15: the SD 1.5 UNet (default); flux / sd3: a joint-attention transformer at the real "
                             "width, reduced depth, at 512^2 and 1024^2 token counts (scripts/bench_joint.py)")
    parser.add_argument("--sizes", default=None, help="flux / sd3: image sides to time, e.g. 512,1024 (the default)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one round, tiny sizes (flux / sd3: a tiny width too); not for figures")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.size = args.size or 64
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model != "sd15":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_joint  # next to this script

        bench_joint.run(args, PeakMemory)
        return

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (512 if cuda else 256)
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    unet = sd15_unet().eval()
    if (device.type, dtype) != ("cpu", torch.float32):
        unet = unet.to(device=device, dtype=dtype)
    latent = size // 8
    cfg_layout = BatchLayout(rows=(Row(False, 0, 0), Row(True, 0, 0)))  # [uncond, cond]
    variants = {**VARIANTS, **optional_variants()}
    if args.edit:
        cfg_layout, variants = edit_variants()
    batch = cfg_layout.batch_size
    sample = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    text = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    token_weights = torch.ones(batch, 77, device=device, dtype=dtype)
    token_weights[:, 5] = 0.5
    setup = {"scheduler": _FixedSchedule(torch.tensor([999, 500, 1])), "token_weights": token_weights,
             "layout": cfg_layout}

    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        variants = {k: v for k, v in variants.items() if k.startswith("stock") or any(w in k for w in wanted)}

    def forward() -> None:
        unet(sample, timestep, text)

    def one_step(variant: Variant) -> float:
        with variant(unet, setup), torch.no_grad():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

    for variant in variants.values():  # warm-up round, not timed
        one_step(variant)
    times = timed_rounds(variants, one_step, args.repeats)

    peak_memory = PeakMemory(device)
    peaks: dict[str, int | None] = {}
    for name, variant in variants.items():  # one more untimed round, for peak memory only
        with variant(unet, setup), torch.no_grad():
            peaks[name] = peak_memory.measure(forward)

    ratios = ratio_cells(times, "stock AttnProcessor2_0")
    held = {name: getattr(variant, "bytes_held", lambda: "-")() for name, variant in variants.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if cuda else ''}")
    print(f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, xattn {xattn.__version__}")
    print(f"SD 1.5-architecture UNet, {size}x{size} ({latent}x{latent} latents), batch {batch}, {dtype}, "
          f"{args.repeats} interleaved rounds\n")
    stock_peak = peaks["stock AttnProcessor2_0"]

    def peak_cells(name: str) -> str:
        if peaks[name] is None:
            return "n/a | n/a"
        ratio = f"{peaks[name] / stock_peak:.2f}" if stock_peak else "-"
        return f"{peaks[name] / 2**20:.1f} | {ratio}"

    print(f"| variant | median s/step | {RATIO_HEADER} | bytes held | step peak MiB | peak ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.4f} | {ratios[name]} | {held[name]} | {peak_cells(name)} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""One-call accelerator check: parity of every attention path in fp16, then the benchmark tables.

On an SD 1.5-size UNet (public config, random weights) at the device's size
(512x512 on CUDA), in the device's dtype (fp16 on CUDA):

1. parity, each against diffusers' stock ``AttnProcessor2_0`` or an explicit
   reference computed in the same run: xattn without hooks, the explicit
   path, the fused ``value_scale`` and ``logit_bias`` paths, and fused
   self-attention injection (``map_rows``) against copying the map;
2. ``scripts/bench_overhead.py``'s tables (plain and edit batch), with peak memory.

    python scripts/gpu_check.py                       # CUDA, fp16, 512x512
    python scripts/gpu_check.py --device cpu --size 64 --skip-bench   # the same checks on CPU, quickly

Prints a parity table with the largest difference relative to the largest
output value, and exits 1 when a path disagrees beyond the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead  # noqa: E402  (the benchmark script beside this one)

import xattn  # noqa: E402
from xattn.hookpoints import BatchLayout, Row  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}  # relative to the output's scale


def parity_checks(unet, sample, timestep, text) -> list[tuple[str, float]]:
    """(check, largest difference / largest reference value) for every attention path."""
    batch = sample.shape[0]
    weights = torch.rand(batch, text.shape[1], generator=torch.Generator().manual_seed(1)) * 1.5 + 0.25
    weights = weights.to(device=sample.device, dtype=sample.dtype)
    layout = BatchLayout(rows=tuple(Row(True, r, 0) for r in range(batch)))

    def run(*controllers) -> torch.Tensor:
        with torch.no_grad():
            if controllers == ("stock",):
                original = unet.attn_processors
                unet.set_attn_processor(AttnProcessor2_0())
                try:
                    return unet(sample, timestep, text).sample.float()
                finally:
                    unet.set_attn_processor(original)
            with xattn.hooks(unet, *controllers, layout=layout):
                return unet(sample, timestep, text).sample.float()

    def borrow(rows, ctx):
        rows[1] = 0
        return rows

    def copy_map(probs, ctx):
        probs = probs.clone()
        probs[1] = probs[0]
        return probs

    def renormalised(probs, ctx):
        scaled = probs * weights[:, None, None, :]
        return scaled / scaled.sum(dim=-1, keepdim=True)

    stock = run("stock")
    pairs = {
        "no hooks vs stock": (run(), stock),
        "explicit path vs stock": (run(xattn.Hook("probs", lambda p, ctx: None, selector="kind=all")), stock),
        "fused value_scale vs explicit multiply": (
            run(xattn.Hook("value_scale", lambda x, ctx: x * weights, selector="kind=cross")),
            run(xattn.Hook("probs", lambda p, ctx: p * weights[:, None, None, :], selector="kind=cross"))),
        "fused logit_bias vs multiply and renormalise": (
            run(xattn.Hook("logit_bias", lambda x, ctx: x + weights.log(), selector="kind=cross")),
            run(xattn.Hook("probs", renormalised, selector="kind=cross"))),
        "fused map_rows (self injection) vs copied map": (
            run(xattn.Hook("map_rows", borrow, selector="kind=self")),
            run(xattn.Hook("probs", copy_map, selector="kind=self"))),
    }
    return [(name, ((got - want).abs().max() / want.abs().max()).item()) for name, (got, want) in pairs.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="image size (default 512 on CUDA, 256 on CPU)")
    parser.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 (default fp16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=10, help="benchmark rounds")
    parser.add_argument("--skip-bench", action="store_true", help="parity checks only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    size = args.size or (512 if cuda else 256)
    dtype_name = args.dtype or ("float16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)

    torch.manual_seed(0)
    unet = bench_overhead.sd15_unet().eval().to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(device=device, dtype=dtype)
    text = torch.randn(2, 77, 768, generator=generator).to(device=device, dtype=dtype)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, "
          f"xattn {xattn.__version__}; SD 1.5-architecture UNet, {size}x{size}, {dtype_name}\n")
    print("| parity check | max difference / max value | tolerance | ok |")
    print("|---|---|---|---|")
    failed = 0
    for check, error in parity_checks(unet, sample, torch.tensor(500, device=device), text):
        ok = error <= TOLERANCE[dtype]
        failed += not ok
        print(f"| {check} | {error:.2e} | {TOLERANCE[dtype]:.0e} | {'yes' if ok else 'NO'} |")
    del unet
    if not args.skip_bench:
        common = ["--device", args.device, "--size", str(size), "--dtype", dtype_name, "--repeats", str(args.repeats)]
        for extra in ([], ["--edit"]):
            print()
            sys.stdout.flush()
            bench_overhead.main(common + extra)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

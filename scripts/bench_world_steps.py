#!/usr/bin/env python
"""A whole 25-step run of the shapes-world pipeline: stock, and under an xattn session with no hooks.

On a model this small, per-call Python work is a visible share of a step.
diffusers' attention modules call ``inspect.signature(processor.__call__)`` at
every call to filter their keyword arguments; xattn's processors store their
signature once (``xattn.processor``). The third variant removes the stored
signature, so each call parses it again, as before. Rounds interleave the
variants; the table gives medians and each median's ratio to stock, from one run.

    python scripts/bench_world_steps.py              # 12 rounds, one thread

Run it on an otherwise idle machine; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import xattn
    from diffusers import StableDiffusionPipeline

    from xattn.processor import XattnProcessor

    pipe = StableDiffusionPipeline.from_pretrained(xattn.world.model_path())
    pipe.set_progress_bar_config(disable=True)
    call = XattnProcessor.__call__
    stored = call.__signature__

    def run():
        pipe("a red circle", num_inference_steps=25, guidance_scale=4.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))

    def under_xattn():
        with xattn.hooks(pipe):
            run()

    def parsed_per_call():
        del call.__signature__
        try:
            under_xattn()
        finally:
            call.__signature__ = stored

    variants = {"stock": run, "xattn, no hooks": under_xattn,
                "xattn, no hooks, signature parsed per call": parsed_per_call}
    seconds = {name: [] for name in variants}
    for variant in variants.values():  # warm-up
        variant()
    for _ in range(args.rounds):
        for name, variant in variants.items():
            start = time.perf_counter()
            variant()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    width = max(map(len, variants))
    print(f"{'variant':<{width}}  ms/run  x stock")
    for name in variants:
        print(f"{name:<{width}}  {median[name] * 1000:6.1f}  {median[name] / median['stock']:7.3f}")
    print(f"(shapes world, 64x64, 25 DDIM steps, batch 1 with guidance, {args.rounds} rounds, "
          f"{args.threads} thread(s); medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Cost per image of Attend-and-Excite: plain sampling, xattn's ``Guide(Excite)``, diffusers' pipeline.

All three run on the shapes-world model, in one process, interleaved round
after round so that drift of the machine cancels out:

- ``plain``: the stock ``StableDiffusionPipeline``;
- ``xattn``: the same pipeline under ``xattn.hooks(pipe, Guide(Excite(nouns)))``;
- ``diffusers``: ``StableDiffusionAttendAndExcitePipeline`` built from the same
  components (``diffusers.pipelines.deprecated`` in diffusers 0.42).

The two guided runs are given the same algorithm: the same steps and
guidance scale, the window ``--window`` (diffusers' ``max_iter_to_alter``),
step size ``--step-size`` (its ``scale_factor``) scaled by ``sqrt`` of 1 -> 0.5
over the run, the refinement thresholds ``--thresholds`` (xattn's
``refine={step: 1 - threshold}``) with at most 20 repeats (diffusers'
hard-coded limit), the same subject tokens (the nouns of each caption, found
with the tokenizer) and the maps of the 16x16 layers only (``attn_res``,
xattn's ``res=16``). Refinement stops when an image's loss reaches its
target, and the two losses normalise the maps differently (diffusers keeps
the padding slots in the softmax, xattn the prompt's words only, as the
paper's code), so the number of denoiser passes may differ: the table
counts them (rows through the denoiser per image, with and without
gradients), so a ratio is read with the work behind it, and how far each
guided variant moved the images from plain sampling (mean absolute
difference of the pixels in 0..1), so a guidance that did nothing shows.
``--thresholds none`` turns refinement off.

    python scripts/bench_guidance.py                        # 2 captions x 2 images, 3 rounds, 1 thread
    python scripts/bench_guidance.py --rounds 5 --images 4 --threads 2 --json /tmp/bench.json

Run it on an otherwise idle machine; the ratios go to docs/guidance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

CAPTIONS = ["a red circle and a blue square", "a green triangle and a yellow circle"]


def parse_thresholds(text: str) -> dict[int, float]:
    if text.strip().lower() in ("", "none"):
        return {}
    pairs = (item.split(":") for item in text.split(","))
    return {int(step): float(value) for step, value in pairs}


def token_indices(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """The slot of each word in the prompt's token ids, as diffusers' ``token_indices`` wants them."""
    ids = tokenizer(prompt).input_ids
    out = []
    for word in words:
        (wid,) = tokenizer(word, add_special_tokens=False).input_ids  # one token each, or the bench is wrong
        out.append(ids.index(wid))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2, help="images per caption (seeds 0..N-1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table reports medians")
    parser.add_argument("--window", type=int, default=None, help="guided steps (default: the first half)")
    parser.add_argument("--step-size", type=float, default=20.0, help="Attend-and-Excite's scale_factor")
    parser.add_argument("--thresholds", default="0:0.05,5:0.5,10:0.8",
                        help="step:threshold refinements (the paper's 0/10/20 of 50 steps, scaled to 25), or none")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (never overwritten)")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; xattn never overwrites a result")
    torch.set_num_threads(args.threads)

    import xattn
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.deprecated import StableDiffusionAttendAndExcitePipeline

    from xattn.guide import Excite, Guide
    from xattn.world import measure

    pipe = StableDiffusionPipeline.from_pretrained(xattn.world.model_path())
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder",)}
    ae = StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False)
    for p in (pipe, ae):
        p.set_progress_bar_config(disable=True)
    defaults = json.loads((xattn.world.model_path() / "xattn_defaults.json").read_text())
    steps, scale = defaults["num_inference_steps"], defaults["guidance_scale"]
    window = args.window if args.window is not None else (steps + 1) // 2  # 13 of 25, as Guide's default 0.5
    thresholds = parse_thresholds(args.thresholds)
    if any(not 0 <= step < window for step in thresholds):
        parser.error(f"--thresholds steps must lie in the window 0..{window - 1} (diffusers would refine "
                     "outside max_iter_to_alter, xattn would not)")
    side = pipe.unet.config.sample_size  # latent side: the largest cross-attention maps
    seeds = list(range(args.images))

    def call(p, prompt, **extra):
        return p(prompt, num_inference_steps=steps, guidance_scale=scale, num_images_per_prompt=len(seeds),
                 generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **extra).images

    def plain(prompt, nouns):
        return call(pipe, prompt)

    def guided(prompt, nouns):
        guide = Guide(Excite(nouns), steps=f"0:{window}", step_size=args.step_size, max_refine=20,
                      refine={step: 1.0 - threshold for step, threshold in thresholds.items()}, res=str(side))
        with xattn.hooks(pipe, guide):
            return call(pipe, prompt)

    def reference(prompt, nouns):
        return call(ae, prompt, token_indices=token_indices(pipe.tokenizer, prompt, nouns),
                    max_iter_to_alter=window, thresholds=thresholds, scale_factor=args.step_size,
                    attn_res=(side, side))

    rows = {"grad": 0, "plain": 0}

    def count(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        rows["grad" if torch.is_grad_enabled() else "plain"] += sample.shape[0]

    pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    variants = {"plain": plain, "xattn Guide(Excite)": guided, "diffusers A&E": reference}
    seconds = {name: [] for name in variants}
    passes = {name: {} for name in variants}
    images = {}
    for round_ in range(args.rounds):
        for name, run in variants.items():
            spent, before = 0.0, dict(rows)
            for prompt in CAPTIONS:
                nouns = [shape for _, shape in measure.object_words(prompt)]
                start = time.perf_counter()
                images[name, prompt] = run(prompt, nouns)
                spent += time.perf_counter() - start
            seconds[name].append(spent / (len(CAPTIONS) * len(seeds)))
            passes[name] = {k: (rows[k] - before[k]) / (len(CAPTIONS) * len(seeds)) for k in rows}
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items()),
              flush=True)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    width = max(map(len, variants))
    changed = {name: float(np.mean([np.abs(images[name, p] - images["plain", p]).mean() for p in CAPTIONS]))
               for name in variants}
    # the ratio within each round as well: the machine's drift between rounds cancels in it
    per_round = {name: statistics.median(s / d for s, d in zip(seconds[name], seconds["diffusers A&E"]))
                 for name in variants}
    print(f"\n{'variant':<{width}}  s/image  x plain  x diffusers  (per round)  denoiser rows/image (grad + plain)  "
          "mean |image - plain|")
    for name in variants:
        print(f"{name:<{width}}  {median[name]:7.3f}  {median[name] / median['plain']:7.2f}  "
              f"{median[name] / median['diffusers A&E']:11.2f}  {per_round[name]:11.2f}  "
              f"{passes[name]['grad']:>17.0f} + {passes[name]['plain']:<13.0f} {changed[name]:.3f}")
    print(f"({len(CAPTIONS)} captions x {len(seeds)} images, {steps} DDIM steps, guidance {scale}, window {window}, "
          f"step size {args.step_size}, thresholds {thresholds or 'none'}, {args.rounds} rounds, "
          f"{args.threads} thread(s); medians)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seconds_per_image": seconds, "median": median, "per_round": per_round,
                                         "passes": passes, "changed": changed,
                                         "args": vars(args) | {"json": str(args.json)}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

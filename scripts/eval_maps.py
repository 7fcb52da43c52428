#!/usr/bin/env python
"""Score shapes-world word maps on held-out two-object captions and print the table.

For each held-out caption (colour-shape combinations never drawn in training)
the embedded model generates images with xattn.Capture running (every cross
site, every step, aggregated); each named object is found by its colour, and
every colour and shape word's map is scored: IoU over a threshold sweep (and
at the best threshold), and the win rate (more attention mass on its own
object than on the other one).

    python scripts/eval_maps.py                  # 16 captions x 4 images
    python scripts/eval_maps.py --pairs 8 --images 2 --json outputs/eval_maps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the embedded shapes world)")
    parser.add_argument("--pairs", type=int, default=16, help="held-out two-object captions")
    parser.add_argument("--images", type=int, default=4, help="images per caption")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 25)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, else 5)")
    parser.add_argument("--select", default=None, help="capture selector, e.g. 'res=16' (default: every cross site)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (a new file)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.images < 1:
        parser.error("--pairs and --images must be at least 1")
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file")
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    from xattn import eval as scoring
    from xattn import runner, world

    path = args.model or world.model_path()
    defaults = runner.model_defaults(path)
    steps = args.steps or int(defaults.get("num_inference_steps", defaults.get("steps", 25)))
    guidance = args.guidance if args.guidance is not None else float(
        defaults.get("guidance_scale", defaults.get("guidance", 5.0)))
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    _, pairs = world.heldout_prompts(n_pair=args.pairs)

    result = scoring.WorldResult(scores=[])
    for index, caption in enumerate(pairs):  # one caption per call keeps memory small and progress visible
        part = scoring.score_world(pipe, [caption], seed=args.seed + index * args.images,
                                   images_per_prompt=args.images, steps=steps, guidance=guidance,
                                   selector=args.select)
        result.scores += part.scores
        result.skipped += part.skipped
        print(f"[{index + 1}/{len(pairs)}] {caption}: {len(part.scores)} words scored, "
              f"{len(part.skipped)} image(s) skipped", file=sys.stderr)

    print(f"model {path}, {len(pairs)} held-out captions x {args.images} images, {steps} steps, "
          f"guidance {guidance}, seed {args.seed}")
    print(scoring.format_table(result.summaries()))
    if result.skipped:
        print(f"\nskipped {len(result.skipped)} image(s): a named object missing, the two drawn as one blob, or shapes bound to the wrong colours")
        for caption, image, why in result.skipped:
            print(f"  {caption!r} image {image}: {why}")
    if args.json is not None:
        figures = {s.label: {"words": s.words, "best_iou": s.best_iou, "best_threshold": s.best_threshold,
                             "win_rate": s.win_rate, "contests": s.contests,
                             "mean_iou_by_threshold": dict(zip(map(str, s.thresholds), s.mean_ious.tolist()))}
                   for s in result.summaries()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(path), "pairs": pairs, "images": args.images, "steps": steps,
                                         "guidance": guidance, "seed": args.seed, "figures": figures,
                                         "skipped": result.skipped}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

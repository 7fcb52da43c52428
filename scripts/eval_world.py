#!/usr/bin/env python
"""Evaluate a shapes-world pipeline on the held-out split.

Prints (and optionally writes as JSON):
  * generation: colour / shape accuracy of single held-out objects and
    both-colours-present rate of held-out pairs, fixed seeds;
  * localisation: cross-attention of colour and shape words on ground-truth
    held-out two-object scenes (own-object win rate, IoU own vs other),
    read with xattn's Capture;
  * reweighting: pixels of a colour when its word's attention is scaled
    with xattn's Reweight (scale mode);
  * captions (--captions): which two-object training captions are drawn
    exactly as named, seed by seed (how the docs' example prompts were chosen).

  python scripts/eval_world.py                      # the shipped model
  python scripts/eval_world.py --model checkpoints/world/latest --quick
  python scripts/eval_world.py --model dit          # the shipped transformer
  python scripts/eval_world.py --skip generation localisation reweight --captions 8
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="pipeline folder, or an embedded model's name: unet (default) or dit")
    ap.add_argument("--seeds", type=int, default=32, help="seeds per single-object prompt")
    ap.add_argument("--pair-seeds", type=int, default=8, help="seeds per pair prompt")
    ap.add_argument("--pairs", type=int, default=16, help="held-out pair prompts")
    ap.add_argument("--scenes", type=int, default=32, help="ground-truth scenes for localisation")
    ap.add_argument("--reweight-prompts", type=int, default=6)
    ap.add_argument("--reweight-seeds", type=int, default=8)
    ap.add_argument("--guidance", type=float, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a few seeds only")
    ap.add_argument("--skip", nargs="*", default=[], choices=["generation", "localisation", "reweight"])
    ap.add_argument("--captions", type=int, default=0, metavar="SEEDS",
                    help="also check every two-object training caption over seeds 0..SEEDS-1")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from xattn.app.runner import load_pipeline, resolve_model
    from xattn.world import heldout_prompts
    from xattn.world.measure import (caption_fidelity, generation_scores, localisation_scores, pair_captions,
                                     reweight_curve)

    folder = resolve_model(args.model)
    pipe = load_pipeline(str(folder), device="cpu", dtype="float32")
    defaults_file = Path(folder) / "xattn_defaults.json"
    defaults = json.loads(defaults_file.read_text()) if defaults_file.exists() else {}
    steps = args.steps or defaults.get("num_inference_steps", 25)
    guidances = args.guidance or [defaults.get("guidance_scale", 4.0)]
    if args.quick:
        args.seeds, args.pair_seeds, args.pairs, args.scenes = 8, 2, 8, 8
        args.reweight_prompts, args.reweight_seeds = 3, 4

    singles, pairs = heldout_prompts(n_pair=args.pairs)
    report: dict = {"model": str(folder), "steps": steps}
    times = []
    for k in range(4):  # the first call warms up
        t0 = time.time()
        pipe("a red circle and a blue square", num_inference_steps=steps, guidance_scale=guidances[0],
             generator=torch.Generator().manual_seed(k), output_type="np")
        times.append(time.time() - t0)
    report["seconds_per_image"] = sorted(times[1:])[1]
    print(f"speed: {report['seconds_per_image']:.2f} s for {steps} steps at batch 1 "
          f"({torch.get_num_threads()} thread)", flush=True)
    if "generation" not in args.skip:
        report["generation"] = {}
        for g in guidances:
            t0 = time.time()
            s = generation_scores(pipe, list(range(args.seeds)), g, steps, singles=singles, pairs=[])
            p = generation_scores(pipe, list(range(args.pair_seeds)), g, steps, singles=[], pairs=pairs)
            row = {"color_acc": s.color_acc, "shape_acc": s.shape_acc, "both_colors": p.both_colors,
                   "one_object": s.one_object, "pair_binding": p.pair_binding,
                   "n_single": s.n_single, "n_pair": p.n_pair, "seconds": round(time.time() - t0, 1)}
            report["generation"][str(g)] = row
            print(f"guidance {g}: colour {s.color_acc:.3f} shape {s.shape_acc:.3f} "
                  f"one object {s.one_object:.3f} (n={s.n_single})  "
                  f"both colours {p.both_colors:.3f} binding {p.pair_binding:.3f} (n={p.n_pair})",
                  flush=True)
    if "localisation" not in args.skip:
        loc = localisation_scores(pipe, n=args.scenes)
        report["localisation"] = vars(loc)
        ratio = loc.iou_own / max(loc.iou_other, 1e-9)
        print(f"localisation: win rate {loc.win_rate:.3f}  IoU own {loc.iou_own:.3f}  "
              f"other {loc.iou_other:.3f}  (x{ratio:.1f}, {loc.n_words} words)", flush=True)
    if "reweight" not in args.skip:
        g = guidances[0]
        curve = reweight_curve(pipe, pairs[: args.reweight_prompts], list(range(args.reweight_seeds)),
                               g, steps)
        report["reweight"] = {str(k): v for k, v in curve.items()}
        print("reweight (colour pixels vs weight 1): "
              + "  ".join(f"w={k:g}: {v:.3f}" for k, v in curve.items()), flush=True)
    if args.captions:
        drawn = caption_fidelity(pipe, pair_captions(), list(range(args.captions)), guidances[0], steps)
        report["captions"] = drawn
        for caption, ok in drawn.items():
            print(f"{sum(ok)}/{len(ok)} drawn as named: {caption}", flush=True)
        always = sum(all(ok) for ok in drawn.values())
        rate = sum(map(sum, drawn.values())) / sum(map(len, drawn.values()))
        print(f"captions: {always} of {len(drawn)} drawn as named in every seed; {rate:.3f} of images", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

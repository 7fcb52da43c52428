#!/usr/bin/env python
"""Measure prompt-to-prompt colour and shape swaps on the shapes-world model over many seeds.

For every training colour swap between two-object captions (the other object
and the shapes fixed), the source and the edited target are sampled in one
batch from each seed's latent, and the target is also sampled plainly (the
re-prompt). The table gives, per swap, how often the edit keeps the object's
mask (IoU >= 0.9 and the colour changed), how often the re-prompt does, the
median IoU and the centroid jitter; then the shape swaps. Judged with
:mod:`xattn.world.measure`, the measures of the edit tests.

The edit is built the way ``xattn edit`` builds it: the options given here go
through the command's own ``edit_options`` with the model's edit defaults
(its ``xattn_defaults.json``), so with no option this measures what a user
gets from ``xattn edit --source ... --target ...``.

    python scripts/eval_edits.py                         # seeds 0..63, xattn edit's default settings
    python scripts/eval_edits.py --seeds 100:132 --self-steps 0.8 --json outputs/edits.json
    python scripts/eval_edits.py --blend none            # plain prompt-to-prompt, no local blending
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

# (source, target, colour before, colour after): colour swaps on combinations seen in training
COLOUR_SWAPS = [
    ("a red circle and a blue triangle", "a yellow circle and a blue triangle", "red", "yellow"),
    ("a yellow circle and a blue triangle", "a red circle and a blue triangle", "yellow", "red"),
    ("a green square and a yellow circle", "a red square and a yellow circle", "green", "red"),
    ("a red square and a yellow circle", "a green square and a yellow circle", "red", "green"),
]
# (source, target, colour of the edited object, new shape)
SHAPE_SWAPS = [
    ("a red circle and a blue triangle", "a red square and a blue triangle", "red", "square"),
    ("a yellow square and a green triangle", "a yellow circle and a green triangle", "yellow", "circle"),
]


def seed_range(text: str) -> list[int]:
    start, _, stop = text.partition(":")
    seeds = list(range(int(start), int(stop))) if stop else list(range(int(start)))
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r} holds no seed; use e.g. 64 or 100:132")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the shipped shapes world)")
    parser.add_argument("--seeds", type=seed_range, default=list(range(64)), help="N (0..N-1) or START:STOP")
    # As xattn edit's options: unset ones come from the model's edit defaults, then the command's own.
    parser.add_argument("--cross-steps", default=None, help="cross-attention replacement window")
    parser.add_argument("--self-steps", default=None, help="self-attention injection window ('none': off)")
    parser.add_argument("--blend", default=None, help="LocalBlend words ('none': off); default: the model's")
    parser.add_argument("--threshold", type=float, default=None, help="LocalBlend threshold (fraction of the map's max)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (a new file)")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file")
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from xattn import runner
    from xattn.cli.edit import edit_options
    from xattn.edit import edit_seeds
    from xattn.world import model_path
    from xattn.world.measure import colour_swap, colour_swap_summary, shape_swap

    pipe = runner.load_pipeline(args.model, device="cpu", dtype="float32")
    defaults = runner.model_defaults(args.model or model_path())
    sampling = {"steps": int(defaults["steps"]), "guidance": float(defaults["guidance"])}
    given = {"cross_steps": args.cross_steps, "self_steps": args.self_steps, "blend": args.blend,
             "threshold": args.threshold}

    def arguments(source: str, target: str) -> dict:
        """What ``xattn edit --source SOURCE --target TARGET`` with these options passes to the edit."""
        return edit_options({**given, "source": source, "target": [target]}, defaults.get("edit"))

    figures: dict = {"settings": {**sampling, **given, "model_edit_defaults": defaults.get("edit"),
                                  "seeds": [args.seeds[0], args.seeds[-1] + 1]},
                     "colour": {}, "shape": {}, "arguments": {}}

    rows = []
    for source, target, before, after in tqdm(COLOUR_SWAPS, desc="colour swaps"):
        options = arguments(source, target)
        figures["arguments"][f"{before}->{after}"] = options
        results = edit_seeds(pipe, source, target, args.seeds, **sampling, **options)
        cases = [colour_swap(seed, r.source, r.targets[0], r.reprompts[0], before, after)
                 for seed, r in zip(args.seeds, results)]
        summary = colour_swap_summary(cases)
        figures["colour"][f"{before}->{after}"] = summary
        rows.append((f"{before} -> {after}", summary))
    shape_rows = []
    for source, target, colour, shape in tqdm(SHAPE_SWAPS, desc="shape swaps"):
        options = arguments(source, target)
        figures["arguments"][f"{colour} -> {shape}"] = options
        results = edit_seeds(pipe, source, target, args.seeds, reprompt=False, **sampling, **options)
        cases = [case for case in (shape_swap(seed, r.source, r.targets[0], colour)
                                   for seed, r in zip(args.seeds, results)) if case.drawn]
        summary = {"cases": len(cases), "kept": float(np.mean([c.kept for c in cases])),
                   "reshaped": float(np.mean([c.new_shape == shape for c in cases])),
                   "median_move_px": statistics.median(c.moved_px for c in cases if c.moved_px is not None)}
        figures["shape"][f"{colour} -> {shape}"] = summary
        shape_rows.append((f"{colour} object -> {shape}", summary))

    print(f"\n{args.model or 'shapes world'}, seeds {args.seeds[0]}..{args.seeds[-1]}, {sampling}, given {given}")
    for name, options in figures["arguments"].items():
        print(f"  {name}: blend {options['blend']}, threshold {options['threshold']}, "
              f"cross {options['cross_steps']}, self {options['self_steps']}")
    print()
    print("| colour swap | cases | mask kept, edit | mask kept, re-prompt | colour changed | median IoU | jitter px |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['cases']} | {s['kept']:.3f} | {s['reprompt_kept']:.3f} | {s['changed']:.3f} | "
              f"{s['median_iou']:.3f} | {s['centroid_jitter_px']:.2f} |")
    total = sum(s["cases"] for _, s in rows)
    overall = sum(s["kept"] * s["cases"] for _, s in rows) / total
    reprompt = sum(s["reprompt_kept"] * s["cases"] for _, s in rows) / total
    print(f"| all | {total} | {overall:.3f} | {reprompt:.3f} | | | |")
    figures["colour"]["all"] = {"cases": total, "kept": overall, "reprompt_kept": reprompt}
    print("\n| shape swap | cases | position kept | shape changed | median move px |")
    print("|---|---|---|---|---|")
    for name, s in shape_rows:
        print(f"| {name} | {s['cases']} | {s['kept']:.3f} | {s['reshaped']:.3f} | {s['median_move_px']:.2f} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

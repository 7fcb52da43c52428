#!/usr/bin/env python
"""Measure attention guidance on the shapes-world model against plain sampling.

On the held-out captions (``xattn.world.heldout_prompts``) and fixed seeds:

- binding: in two-object captions, each named colour's blob has its named shape
  (plain, ``Bind``, ``Excite`` + ``Bind``), also split into the objects of
  colour-shape combinations held out of training and those of trained ones;
- objects: exactly one object for one-object captions (plain, ``Excite``,
  ``Focus``), both colours for pairs;
- boxes: the object's centroid inside its box, for left/right and top/bottom
  halves (plain, ``Layout``), on a model that never saw positions.

Judged with :mod:`xattn.world.measure`. Prints a table; ``--json`` keeps it.

    python scripts/eval_guidance.py                   # seeds 0-7
    python scripts/eval_guidance.py --seeds 4 --first-seed 2
    python scripts/eval_guidance.py --seeds 16 --step-size 20 --word-step-size 0.5 --json outputs/guidance.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

BOXES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
         "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="N seeds per caption")
    parser.add_argument("--first-seed", type=int, default=0, help="the first of them (step sizes were chosen on 0-1)")
    parser.add_argument("--step-size", type=float, default=20.0, help="for Layout and Focus (Attend-and-Excite's 20)")
    parser.add_argument("--word-step-size", type=float, default=0.5,
                        help="for Excite and Bind (their losses are on another scale; 0.5 chosen on seeds 0-1)")
    parser.add_argument("--steps", default="0.5", help="guidance window")
    parser.add_argument("--focus-radius", type=float, default=0.35,
                        help="Focus's disk, a fraction of the map's side (0.35 chosen on seeds 0, 1 and 6-9)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the table here (never overwritten)")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; xattn never overwrites a result")
    torch.set_num_threads(args.threads)

    import xattn
    from diffusers import StableDiffusionPipeline
    from xattn.guide import Bind, Excite, Focus, Guide, Layout
    from xattn.world import heldout_prompts
    from xattn.world import measure
    from xattn.world.scenes import HELD_OUT

    pipe = StableDiffusionPipeline.from_pretrained(xattn.world.model_path())
    pipe.set_progress_bar_config(disable=True)
    defaults = json.loads((xattn.world.model_path() / "xattn_defaults.json").read_text())
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    singles, pairs = heldout_prompts(n_pair=16)

    def images(prompt, controllers):
        start = time.perf_counter()
        if controllers:
            with xattn.hooks(pipe, *controllers):
                out = measure.generate(pipe, prompt, seeds, defaults["guidance_scale"], defaults["num_inference_steps"])
        else:
            out = measure.generate(pipe, prompt, seeds, defaults["guidance_scale"], defaults["num_inference_steps"])
        return out, time.perf_counter() - start

    def guide(*losses, step_size=None):
        return [Guide(*losses, step_size=step_size or args.word_step_size, steps=args.steps)]

    rows, seconds = {}, {}

    def add(name, value, spent):
        rows[name] = value
        seconds[name] = seconds.get(name, 0.0) + spent

    for label, make in [("plain", lambda named: []),
                        ("bind", lambda named: guide(Bind(dict(named)))),
                        ("excite+bind", lambda named: guide(Excite([w for pair in named for w in pair]),
                                                            Bind(dict(named))))]:
        bound, both, spent = [], [], 0.0
        by_combo = {True: [], False: []}  # held out of training or not -> that object's binding
        for prompt in pairs:
            named = measure.object_words(prompt)
            batch, took = images(prompt, make(named))
            spent += took
            for image in batch:
                for c, s in named:
                    ok = measure.classify_shape(measure.segment(image, c), min_pixels=measure.MIN_BLOB) == s
                    bound.append(ok)
                    by_combo[(c, s) in HELD_OUT].append(ok)
                both.append(all(measure.object_mask(image, c).sum() >= measure.MIN_BLOB for c, _ in named))
        add(f"pairs binding, {label}", float(np.mean(bound)), spent)
        add(f"pairs binding of held-out combinations, {label}", float(np.mean(by_combo[True])), 0.0)
        add(f"pairs binding of training combinations, {label}", float(np.mean(by_combo[False])), 0.0)
        add(f"pairs both colours, {label}", float(np.mean(both)), 0.0)

    for label, make in [("plain", lambda named: []),
                        ("excite", lambda named: guide(Excite([w for pair in named for w in pair]))),
                        ("focus", lambda named: guide(Focus([w for pair in named for w in pair], args.focus_radius),
                                                      step_size=args.step_size))]:
        one, colour_ok, shape_ok, spent = [], [], [], 0.0
        for prompt in singles:
            ((colour, shape),) = measure.object_words(prompt)
            batch, took = images(prompt, make(measure.object_words(prompt)))
            spent += took
            one += [sum(c.sum() >= measure.MIN_BLOB for c in measure.components(measure.foreground(i))) == 1
                    for i in batch]
            colour_ok += [measure.dominant_color(i) == colour for i in batch]
            shape_ok += [measure.classify_shape(measure.foreground(i)) == shape for i in batch]
        add(f"singles exactly one object, {label}", float(np.mean(one)), spent)
        add(f"singles colour named, {label}", float(np.mean(colour_ok)), 0.0)
        add(f"singles shape named, {label}", float(np.mean(shape_ok)), 0.0)

    for box_name, box in BOXES.items():
        for label, guided in [("plain", False), ("layout", True)]:
            inside, spent = [], 0.0
            for prompt in singles:
                ((colour, shape),) = measure.object_words(prompt)
                layout = Layout({f"{colour} {shape}": box})
                batch, took = images(prompt, guide(layout, step_size=args.step_size) if guided else [])
                spent += took
                for image in batch:
                    mask = measure.object_mask(image, colour)
                    if mask.sum() < measure.MIN_BLOB:
                        inside.append(False)
                        continue
                    y, x = measure.centroid(mask)
                    h, w = mask.shape
                    inside.append(box[0] * w <= x < box[2] * w and box[1] * h <= y < box[3] * h)
            add(f"box {box_name}, {label}", float(np.mean(inside)), spent)

    width = max(len(name) for name in rows)
    print(f"{'measure':<{width}}  rate   seconds")
    for name, value in rows.items():
        print(f"{name:<{width}}  {value:.3f}  {seconds[name]:.1f}")
    print(f"({len(pairs)} pair and {len(singles)} single captions x {len(seeds)} seeds, "
          f"step size {args.step_size} (Layout, Focus) and {args.word_step_size} (Excite, Bind), window {args.steps}; "
          "seconds are wall time of that row, one thread)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rates": rows, "seconds": seconds, "args": vars(args) | {"json": str(args.json)}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

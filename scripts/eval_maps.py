#!/usr/bin/env python
"""Score shapes-world word maps against object masks, for every way of making them, and print the table.

The protocol (docs/maps.md): held-out two-object captions, the same seeds for
every caption (image k uses seed + k), guidance 5, 25 DDIM steps. Each caption
is generated once with the default ``xattn.Capture`` running; every choice of
word-map options is then made from the same captured sums, and each colour and
shape word is scored against its object (found by colour): IoU with the map
above its own mean, the best IoU over a threshold sweep of the min-max scaled
map, and the win rate (more attention mass on its own object than on the other).
Images where a named object is missing, touches the other or has the wrong
shape are skipped (they measure the generator, not the maps).

    python scripts/eval_maps.py                          # 12 captions x seeds 0-3
    python scripts/eval_maps.py --daam-python /tmp/daam-venv/bin/python   # DAAM 0.2 side by side
    python scripts/eval_maps.py --pairs 4 --images 2 --json outputs/eval_maps.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

# (label, WordMaps.word options): the defaults before docs/maps.md, each alternative, the defaults now
VARIANTS: list[tuple[str, dict]] = [
    ("old default: every site, bilinear", {"exclude": None, "upsample": "bilinear"}),
    ("no mid block, bilinear", {"upsample": "bilinear"}),
    ("every site, bicubic", {"exclude": None}),
    ("no mid block, nearest", {"upsample": "nearest"}),
    ("largest resolution only, bicubic", {"res": "largest"}),
    ("new default: no mid block, bicubic", {}),
]


def scoring_module():
    """The world's map scoring, wherever this version of xattn keeps it."""
    try:
        from xattn.world.measure import maps as scoring
    except ImportError:
        from xattn import eval as scoring
    return scoring


class Variant:
    """Word maps seen through one choice of options, as the world scoring reads them.

    With ``at_mean=True`` the scaled map is replaced by ``map > mean(map)``, so
    that any threshold in (0, 1] scores the IoU at the map's own mean.
    """

    def __init__(self, maps, options: dict, at_mean: bool = False):
        self.maps, self.at_mean = maps, at_mean
        self.options = dict(options)
        if self.options.get("res") == "largest":
            self.options["res"] = maps.resolutions[0]
        self.prompts, self.images_per_prompt = maps.prompts, maps.images_per_prompt

    def word(self, key, prompt: int = 0, image: int = 0, *, size=None, normalize: bool = True) -> torch.Tensor:
        heat = self.maps.word(key, prompt, image, size=size, normalize=normalize, **self.options)
        return (heat > heat.mean()).float() if normalize and self.at_mean else heat


class DaamMaps:
    """DAAM's maps of one caption, read from ``scripts/daam_maps.py``'s file, with xattn's word lookup."""

    def __init__(self, arrays, index: int, caption: str, seeds: list[int], token_map, at_mean: bool = False):
        self.maps = [torch.from_numpy(arrays[f"{index}/{seed}/maps"]).double() for seed in seeds]
        self.images = [arrays[f"{index}/{seed}/image"] for seed in seeds]
        self.prompts, self.images_per_prompt = [caption], len(seeds)
        self.token_map, self.at_mean = token_map, at_mean

    def word(self, key, prompt: int = 0, image: int = 0, *, size=None, normalize: bool = True) -> torch.Tensor:
        heat = self.maps[image][self.token_map.indices(key)].mean(dim=0)  # DAAM averages a word's pieces
        if not normalize:
            return heat.float()
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)  # DAAM's expand_as scaling
        return (heat > heat.mean()).float() if self.at_mean else heat.float()


def score(scoring, groups) -> dict:
    """groups: (maps-like at the sweep, maps-like at the mean, images) per caption -> the table's figures."""
    sweep, at_mean, skipped = [], [], 0
    for swept, meaned, images in groups:
        result = scoring.score_world_images(swept, images)
        sweep += result.scores
        skipped += len(result.skipped)
        at_mean += scoring.score_world_images(meaned, images, thresholds=(0.5,)).scores
    best = scoring.summarize(sweep)
    mean = scoring.summarize(at_mean, thresholds=(0.5,))
    return {"iou_at_mean": mean.best_iou, "best_iou": best.best_iou, "best_threshold": best.best_threshold,
            "win_rate": best.win_rate, "words": best.words, "skipped_images": skipped}


def run_daam(args, path: Path, pairs: list[str], seeds: list[int], steps: int, guidance: float) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="xattn-daam-"))
    captions = folder / "captions.json"
    captions.write_text(json.dumps(pairs))
    out = folder / "daam.npz"
    command = [args.daam_python, str(HERE / "daam_maps.py"), "--model", str(path), "--captions", str(captions),
               "--seeds", ",".join(map(str, seeds)), "--steps", str(steps), "--guidance", str(guidance),
               "--threads", str(args.threads), "--out", str(out)]
    print(f"running DAAM: {' '.join(command)}", file=sys.stderr)
    subprocess.run(command, check=True)
    return out


def capture_bytes(pipe, caption: str, seed: int, steps: int, guidance: float) -> dict:
    """Bytes a capture holds for one image of ``caption``: the default, and every one of the 77 slots."""
    import xattn
    from xattn.capture import Capture

    held = {}
    for label, capture in (("prompt slots", Capture()), ("all 77 slots", Capture(slots="all"))):
        with xattn.hooks(pipe, capture):
            pipe(caption, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed), output_type="np")
        held[label] = capture.bytes_held()
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the embedded shapes world)")
    parser.add_argument("--pairs", type=int, default=12, help="held-out two-object captions")
    parser.add_argument("--images", type=int, default=4, help="images per caption; image k uses seed + k")
    parser.add_argument("--seed", type=int, default=0, help="seed of every caption's first image")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--daam-python", default=None,
                        help="a Python with DAAM 0.2 installed: also score DAAM's maps (scripts/daam_maps.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (a new file)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.images < 1:
        parser.error("--pairs and --images must be at least 1")
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file")
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    import xattn
    from xattn import world
    from xattn.capture import Capture
    from xattn.tokens import TokenMap

    scoring = scoring_module()
    path = args.model or world.model_path()
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    _, pairs = world.heldout_prompts(n_pair=args.pairs)
    seeds = [args.seed + k for k in range(args.images)]

    captured = []
    for index, caption in enumerate(pairs):
        capture = Capture()
        with xattn.hooks(pipe, capture):
            output = pipe([caption], num_images_per_prompt=args.images, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, generator=[torch.Generator().manual_seed(s) for s in seeds],
                          output_type="np")
        images = [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in output.images]
        captured.append((capture.maps(), images))
        print(f"[{index + 1}/{len(pairs)}] {caption}", file=sys.stderr)

    rows = {label: score(scoring, [(Variant(m, options), Variant(m, options, at_mean=True), images)
                                   for m, images in captured])
            for label, options in VARIANTS}
    daam_bytes = None
    if args.daam_python:
        arrays = np.load(run_daam(args, path, pairs, seeds, args.steps, args.guidance))
        groups = []
        for index, caption in enumerate(pairs):
            token_map = TokenMap(pipe.tokenizer, caption)
            swept = DaamMaps(arrays, index, caption, seeds, token_map)
            groups.append((swept, DaamMaps(arrays, index, caption, seeds, token_map, at_mean=True), swept.images))
        rows["DAAM 0.2 (its defaults, run in its own venv)"] = score(scoring, groups)
        daam_bytes = int(arrays["bytes_held"])

    print(f"model {path}: {len(pairs)} held-out captions x seeds {seeds[0]}-{seeds[-1]}, {args.steps} steps, "
          f"guidance {args.guidance}; colour and shape words")
    print(f"{'word maps':<44}{'IoU>mean':>9}{'best IoU':>9}{'at t':>6}{'win rate':>9}{'words':>6}{'skipped':>8}")
    for label, r in rows.items():
        print(f"{label:<44}{r['iou_at_mean']:>9.3f}{r['best_iou']:>9.3f}{r['best_threshold']:>6.2f}"
              f"{r['win_rate']:>9.1%}{r['words']:>6}{r['skipped_images']:>8}")

    held = capture_bytes(pipe, pairs[0], seeds[0], args.steps, args.guidance)
    print(f"\nbytes held for one image of {pairs[0]!r} (every cross site, every step, aggregated):")
    for label, count in held.items():
        print(f"  xattn Capture, {label:<14}{count:>9,d} B")
    old = 2 * held["all 77 slots"]  # before docs/maps.md: 77 slots, and a head-sum scratch as large as each sum
    print(f"  xattn before: 77 slots + scratch{old:>9,d} B  (now {held['prompt slots'] / old:.1%} of it)")
    if daam_bytes is not None:
        print(f"  DAAM 0.2 trace{'':<15}{daam_bytes:>9,d} B  (xattn holds {held['prompt slots'] / daam_bytes:.1%})")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(path), "pairs": pairs, "seeds": seeds, "steps": args.steps,
                                         "guidance": args.guidance, "rows": rows, "bytes_held": held,
                                         "daam_bytes_held": daam_bytes}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Effect curves of word reweighting on the shapes-world model, for docs/reweighting.md.

For each mode (scale, bias, embedding) and weight of a colour word, generates
the same seeds for several prompts and measures, with the world's colour
segmenter:

- the share of the image's pixels in the swept colour (mean over seeds, then prompts),
- the same share for the prompt's other colour,
- the mean absolute pixel change from the weight-1 image of the same seed.

It also measures a step window (weight 0 only in steps 0:0.3) against every
step. Prints a markdown table; ``--json`` keeps the numbers (never overwritten).

    python scripts/reweight_curve.py --seeds 16 --weights=-1,0,0.5,1,2,4 --json /tmp/curve.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from xattn import runner
from xattn.reweight import MODES, Reweight, ReweightError
from xattn.session import hooks
from xattn.world import model_path, object_words, segment

PROMPTS = (
    "a red circle and a blue triangle",
    "a green square and a yellow circle",
    "a yellow triangle and a blue circle",
)
WEIGHTS = (-1.0, 0.0, 0.1, 0.25, 0.3, 0.5, 1.0, 1.5, 2.0, 4.0)
WINDOW = "0:0.3"


def colour_share(images: np.ndarray, colour: str) -> float:
    return float(np.mean([segment(image, colour).mean() for image in images]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16, help="images per prompt and weight (seeds 0..N-1)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of modes")
    parser.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS))
    parser.add_argument("--json", type=Path, help="write the numbers here (must not exist)")
    args = parser.parse_args()
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; pick a new file")
    torch.set_num_threads(1)
    modes = args.modes.split(",")
    weights = [float(w) for w in args.weights.split(",")]
    if 1.0 not in weights:
        weights.append(1.0)

    pipe = runner.load_pipeline(None, device="cpu", dtype="float32")
    defaults = runner.model_defaults(model_path())
    settings = {"steps": int(defaults.get("steps", 25)), "guidance": float(defaults.get("guidance", 5.0))}

    def images(prompt: str, controller) -> np.ndarray:
        with hooks(pipe, controller):
            pictures = runner.generate(pipe, prompt, seed=0, num_images_per_prompt=args.seeds, **settings)
        return np.stack([np.asarray(p.convert("RGB")) for p in pictures]).astype(np.int16)

    started = time.time()
    rows = []
    plain = {prompt: images(prompt, Reweight({})) for prompt in PROMPTS}
    for mode in modes:
        for weight in weights:
            per_prompt, refused = [], None
            for prompt in PROMPTS:
                (word, _), (other, _) = object_words(prompt)[:2]
                try:  # bias refuses w <= 0; embedding refuses rows whose mean it cannot restore
                    made = plain[prompt] if weight == 1.0 else images(prompt, Reweight({word: weight}, mode=mode))
                except ReweightError as error:
                    refused = str(error)
                    break
                per_prompt.append((colour_share(made, word), colour_share(made, other),
                                   float(np.abs(made - plain[prompt]).mean())))
            if refused is not None:
                rows.append({"mode": mode, "weight": weight, "refused": refused})
                continue
            word_share, other_share, change = (float(np.mean(column)) for column in zip(*per_prompt))
            rows.append({"mode": mode, "weight": weight, "word_share": word_share,
                         "other_share": other_share, "pixel_change": change})
    window = {}
    for label, steps in ((f"steps {WINDOW}", WINDOW), ("every step", None)):
        changes = []
        for prompt in PROMPTS:
            word = object_words(prompt)[0][0]
            made = images(prompt, Reweight({word: 0.0}, steps=steps))
            changes.append(float(np.abs(made - plain[prompt]).mean()))
        window[label] = float(np.mean(changes))

    print("| mode | weight | swept colour share | other colour share | mean abs pixel change |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        if "refused" in row:
            print(f"| {row['mode']} | {row['weight']:g} | refused: {row['refused'].split(';')[0]} | | |")
            continue
        print(f"| {row['mode']} | {row['weight']:g} | {row['word_share']:.4f} | {row['other_share']:.4f} "
              f"| {row['pixel_change']:.2f} |")
    print()
    print("| scale mode, weight 0 on the colour word, applied in | mean abs pixel change |")
    print("|---|---:|")
    for label, change in window.items():
        print(f"| {label} | {change:.2f} |")
    print(f"\n{len(PROMPTS)} prompts x {args.seeds} seeds, {settings['steps']} steps, guidance "
          f"{settings['guidance']:g}; {time.time() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"prompts": PROMPTS, "seeds": args.seeds, **settings,
                                         "curve": rows, "window": window}, indent=2) + "\n")


if __name__ == "__main__":
    main()

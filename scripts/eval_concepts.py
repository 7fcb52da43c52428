#!/usr/bin/env python
"""Concept maps (ConceptAttention) against raw image->text word maps, on the shapes-world transformer.

Held-out two-object scenes are encoded, noised at three times and denoised
once with their caption (the inputs of the model card's localisation figure).
On the same call's inputs, each colour and shape word gets
  raw:      its image->text attention (xattn.Capture, head-mean, every joint block);
  concept:  its ConceptAttention map (xattn.concepts, output space, softmax over
            the concept list: every colour and shape word of the world).
Scored against the word's object mask: own-object win rate, IoU at the map's
mean, IoU at the best single threshold, and the extra time per transformer call.

    python scripts/eval_concepts.py --scenes 64
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xattn.world import COLORS, SHAPES, heldout_scenes, mask_iou
from xattn.world.data import object_slots
from xattn.world.measure.maps import score_word, summarize
from xattn.world.measure.model import denoiser_call, scene_concept_maps, scene_word_maps


def scaled(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def table(pipe, scenes, concepts) -> dict[str, dict]:
    last = [len(pipe.transformer.transformer_blocks) - 1]
    scores = {"raw": [], "concept": [], "concept-last": [], "cross": []}
    mean_iou = {key: [] for key in scores}
    for k, scene in enumerate(scenes):
        slots = object_slots(scene)
        raw = scene_word_maps(pipe, scene, [s for pair in slots for s in pair], seed=k)
        ours = {"concept": scene_concept_maps(pipe, scene, concepts, seed=k),
                "concept-last": scene_concept_maps(pipe, scene, concepts, seed=k, blocks=last),
                "cross": scene_concept_maps(pipe, scene, concepts, seed=k, kind="cross")}
        words = scene.words
        for obj_idx, obj in enumerate(scene.objects):
            rival = scene.objects[1 - obj_idx]
            for which, slot in enumerate(slots[obj_idx]):
                word = words[slot - 1]
                maps = {"raw": raw[slot], **{key: ours[key][word] for key in ours}}
                for key, m in maps.items():
                    unit = scaled(m)
                    scores[key].append(score_word(unit, m, obj.mask, rival.mask, word=word,
                                                  kind=("colour", "shape")[which]))
                    mean_iou[key].append(mask_iou(unit >= unit.mean(), obj.mask))
    return {key: dict(summary=summarize(scores[key], key), mean_iou=float(np.mean(mean_iou[key])))
            for key in scores}


@torch.no_grad()
def cost(pipe, scene, concepts, repeats: int) -> tuple[float, float]:
    def timed(fn):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats

    from xattn.concepts import concepts as concept_maps

    denoise = denoiser_call(pipe, scene, (500,), 0)

    def with_concepts():
        with concept_maps(pipe, concepts):
            denoise()

    return timed(denoise), timed(with_concepts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded transformer)")
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20, help="timed calls for the cost line (0: no timing)")
    ap.add_argument("--cost-only", action="store_true", help="only the cost line (time it on an idle machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from xattn.app.runner import load_pipeline

    pipe = load_pipeline(args.model or "dit", device="cpu", dtype="float32")
    concepts = list(COLORS) + list(SHAPES)
    scenes = heldout_scenes(args.scenes)
    if not args.cost_only:
        print_table(table(pipe, scenes, concepts), scenes, concepts)
    if args.repeats:
        plain, extra = cost(pipe, scenes[0], concepts, args.repeats)
        print(f"\none transformer call (1 row, {args.threads} thread): plain {plain * 1000:.1f} ms, "
              f"with {len(concepts)} concepts {extra * 1000:.1f} ms (×{extra / plain:.2f})")


def print_table(rows: dict, scenes, concepts) -> None:
    print(f"{len(scenes)} held-out two-object scenes, {rows['raw']['summary'].words} words; "
          f"concepts: {', '.join(concepts)}\n")
    print("| maps | own-object win | IoU at the map's mean | best IoU (threshold) |")
    print("|---|---|---|---|")
    names = {"raw": "raw image→text attention (Capture)", "concept": "concept maps, output space (ConceptAttention)",
             "concept-last": "concept maps, output space, last block only",
             "cross": "concept maps, image queries × concept keys"}
    for key, row in rows.items():
        s = row["summary"]
        print(f"| {names[key]} | {s.win_rate:.3f} | {row['mean_iou']:.3f} | {s.best_iou:.3f} ({s.best_threshold:.2f}) |")


if __name__ == "__main__":
    main()

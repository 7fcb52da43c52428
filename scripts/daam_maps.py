#!/usr/bin/env python
"""DAAM's word maps for the shapes world, for a side-by-side run of ``scripts/eval_maps.py --daam-python``.

Runs in its own virtual environment (DAAM 0.2 needs diffusers 0.21), never
inside xattn's: it imports only DAAM, diffusers and torch. For every caption
and seed it generates one image under ``daam.trace`` (DAAM supports one image
per call) and writes the image and DAAM's map of every token slot of the
prompt, at the image's size, to one ``.npz`` file:

    /tmp/daam-venv/bin/python scripts/daam_maps.py --model MODEL --captions CAPTIONS.json \\
        --seeds 0,1,2,3 --out daam.npz

Two things are adapted, both of which DAAM hard-codes for 512-pixel Stable
Diffusion: the latent size (DAAM assumes 64x64 or 96x96 latents; the shapes
world's are 16x16, which it would turn into scale factors no default accepts)
is set to the real one, and spaCy (used only for DAAM's syntax features) is
replaced by an empty module. Everything else is DAAM's defaults: no mid block,
every head and layer, bicubic upsampling, min-max scaling at expansion.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path


def _stub_spacy() -> None:
    """DAAM imports spaCy at module level for parsing features this run does not use."""
    from importlib.machinery import ModuleSpec

    spacy = types.ModuleType("spacy")
    spacy.__spec__ = ModuleSpec("spacy", None)
    tokens = types.ModuleType("spacy.tokens")
    tokens.__spec__ = ModuleSpec("spacy.tokens", None)
    tokens.Token = object
    spacy.tokens = tokens
    spacy.load = None
    sys.modules.setdefault("spacy", spacy)
    sys.modules.setdefault("spacy.tokens", tokens)


def _load_text_encoder(pipe, model: Path) -> None:
    """Load the text encoder's weights by hand: newer transformers save them without the ``text_model.`` prefix
    that transformers 4.30 looks for (it would silently start from random weights)."""
    from safetensors.torch import load_file

    weights = load_file(str(model / "text_encoder" / "model.safetensors"))
    named = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in weights.items()}
    missing, unexpected = pipe.text_encoder.load_state_dict(named, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text encoder weights do not fit: missing {missing}, unexpected {unexpected}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the pipeline folder")
    parser.add_argument("--captions", type=Path, required=True, help="a JSON list of captions")
    parser.add_argument("--seeds", required=True, help="comma-separated seeds, one image each")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="the .npz file to write (new)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new file")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    _stub_spacy()
    import daam
    from daam.trace import UNetCrossAttentionHooker
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(args.model), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    _load_text_encoder(pipe, args.model)
    pipe.set_progress_bar_config(disable=True)
    latent_side = pipe.unet.config.sample_size
    captions = json.loads(args.captions.read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    arrays: dict[str, np.ndarray] = {}
    for c, caption in enumerate(captions):
        slots = len(pipe.tokenizer.tokenize(caption)) + 2  # start, the pieces, the first end token
        for seed in seeds:
            tc = daam.trace(pipe)
            tc.latent_hw = latent_side * latent_side  # DAAM's guess (64x64 or 96x96 latents) does not fit here
            for hooker in tc.module:
                if isinstance(hooker, UNetCrossAttentionHooker):
                    hooker.latent_hw = tc.latent_hw
            with tc:
                out = pipe(caption, num_inference_steps=args.steps, guidance_scale=args.guidance,
                           generator=torch.Generator().manual_seed(seed), output_type="np")
                global_map = tc.compute_global_heat_map(prompt=caption)
                image = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
                size = image.shape[:2]
                maps = []
                for slot in range(slots):
                    word = daam.WordHeatMap(global_map.heat_maps[slot])
                    picture = types.SimpleNamespace(size=size)  # expand_as reads only .size
                    maps.append(word.expand_as(picture, absolute=True).numpy())
            if not arrays:  # what DAAM holds for one image: its running sums per (factor, layer, head)
                held = sum(t.numel() * t.element_size() for _, t in tc.all_heat_maps)
                arrays["bytes_held"] = np.array(held)
            arrays[f"{c}/{seed}/image"] = image
            arrays[f"{c}/{seed}/maps"] = np.stack(maps).astype(np.float32)  # [slots, H, W], before min-max
            print(f"[daam] {caption!r} seed {seed}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, captions=np.array(captions), seeds=np.array(seeds), **arrays)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

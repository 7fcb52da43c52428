"""Write trained components as a plain diffusers StableDiffusionPipeline folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from ..assets import clip_tokenizer_path
from .models import make_sample_scheduler
from .scenes import SHAPES

# Sampling settings, and the edit settings that keep an object's mask under a colour swap (docs/editing.md).
DEFAULTS = {"guidance_scale": 4.0, "num_inference_steps": 25, "height": 64, "width": 64,
            "edit": {"blend": "edited-object", "object_words": list(SHAPES), "threshold": 0.85,
                     "inverted": {"self_steps": "0:0.6", "blend_pixels": 4}}}  # real images (scripts/eval_inversion.py)


def load_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(clip_tokenizer_path())


def save_pipeline(folder: Path, vae, text_encoder, unet, defaults: dict | None = None) -> Path:
    """Save fp32 safetensors + the real CLIP tokenizer files + DDIM scheduler.

    The tokenizer folder gets vocab.json/merges.txt from xattn.assets rather
    than transformers' tokenizer.json, which is twice as large.
    """
    folder = Path(folder)
    unet.set_default_attn_processor()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
        scheduler=make_sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    tok = folder / "tokenizer"
    shutil.rmtree(tok)
    shutil.copytree(clip_tokenizer_path(), tok,
                    ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    (folder / "xattn_defaults.json").write_text(json.dumps(defaults or DEFAULTS, indent=2) + "\n")
    return folder


DIT_DEFAULTS = {"guidance_scale": 4.0, "num_inference_steps": 25, "height": 64, "width": 64}


def save_dit_pipeline(folder: Path, vae, text_encoders, transformer, defaults: dict | None = None) -> Path:
    """Save the joint-attention model as a StableDiffusion3Pipeline folder without T5.

    Both CLIP tokenizers are the same real CLIP files; the T5 part of the text
    is the pipeline's own zeros (``text_encoder_3=None``), as in SD3 run without T5.
    """
    from diffusers import StableDiffusion3Pipeline

    from .models import make_flow_scheduler

    folder = Path(folder)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_flow_scheduler(), vae=vae,
        text_encoder=text_encoders[0], tokenizer=load_tokenizer(),
        text_encoder_2=text_encoders[1], tokenizer_2=load_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
        index[name] = [None, None]  # so from_pretrained(folder) needs no arguments
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / name)
        shutil.copytree(clip_tokenizer_path(), folder / name,
                        ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    (folder / "xattn_defaults.json").write_text(json.dumps(defaults or DIT_DEFAULTS, indent=2) + "\n")
    return folder

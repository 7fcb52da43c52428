"""A tiny random-weight PixArtSigmaPipeline (T5 text, two cross-attention blocks, 2x2 patches), built offline."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_t5 import t5_encoder, t5_tokenizer


def pixart_pipeline():
    """The pipeline in memory (seeded), progress bars off."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=1, sample_size=16)
    pipe = PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(hidden=32).eval(), vae=vae,
                               transformer=transformer.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pixart(folder: Path) -> Path:
    pixart_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def load_pixart(folder: Path):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe

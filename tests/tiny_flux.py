"""A tiny random-weight FluxPipeline, saved and loaded back offline (one double- and one single-stream block).

CLIP gives the pooled vector, T5 the text sequence (both tiny, random);
the VAE has one block, so latents are the image's size with 4 channels,
packed 2 x 2 into 16-channel tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import tokenizer
from tiny_t5 import t5_encoder, t5_tokenizer


def save_flux_pipeline(folder: Path, t5_length: int = 16) -> Path:
    """Build the tiny pipeline (seeded) and save it to ``folder``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611, sample_size=16)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=tokenizer(),
                 text_encoder_2=t5_encoder(hidden=16), tokenizer_2=t5_tokenizer(max_length=t5_length),
                 transformer=transformer).save_pretrained(folder)
    return folder


def load_flux_pipeline(folder: Path):
    """The saved pipeline, loaded offline, progress bars off."""
    from diffusers import FluxPipeline

    loaded = FluxPipeline.from_pretrained(folder, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded

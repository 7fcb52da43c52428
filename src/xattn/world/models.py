"""Builders for the shapes-world components, all stock diffusers/transformers classes.

Why stock classes: the shipped folder must load as a plain
StableDiffusionPipeline, so hooks written for SD work on it unchanged.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_HIDDEN = 32  # the 49408-row embedding table dominates the file size
MAX_TOKENS = 77

# SD 1.x noise schedule
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon")


def make_vae() -> AutoencoderKL:
    """4x down (64x64x3 -> 16x16x4); three blocks, so vae_scale_factor is 4."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=64,
    )


def make_text_encoder() -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def make_unet(channels: tuple[int, int, int] = (32, 64, 96)) -> UNet2DConditionModel:
    """Cross-attention at 16x16 and 8x8 (down and up) and in the 4x4 mid block."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels, layers_per_block=1,
        # attention_head_dim is diffusers' legacy name for the head *count*:
        # 16 channels per head at every level
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=(2, 4, 6),
        norm_num_groups=8,
    )


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def make_sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="leading")

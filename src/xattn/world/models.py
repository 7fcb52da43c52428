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


# --- the joint-attention model: an SD3-style diffusion transformer --------------------------------

DIT_TEXT_HIDDEN = (32, 8)  # CLIP-L-like and CLIP-G-like encoders; their outputs are concatenated
DIT_TEXT_DIM = sum(DIT_TEXT_HIDDEN)  # = joint_attention_dim, so the CLIP part needs no zero padding


def make_dit_text_encoders() -> tuple:
    """Two causal CLIP encoders with projections, as StableDiffusion3Pipeline expects.

    The pipeline reads each one's penultimate hidden layer and its projected
    end token (the pooled vector); the second is kept tiny because its
    49408-row token table is most of its size.
    """
    from transformers import CLIPTextModelWithProjection

    encoders = []
    for hidden, layers in zip(DIT_TEXT_HIDDEN, (3, 2)):
        cfg = CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=hidden,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
        encoders.append(CLIPTextModelWithProjection(cfg))
    return tuple(encoders)


def make_dit(layers: int = 4, heads: int = 4, head_dim: int = 24):
    """SD3Transformer2DModel on the 16x16x4 latents: 2x2 patches, so an 8x8 grid of image tokens."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=DIT_TEXT_DIM,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=DIT_TEXT_DIM,
        pos_embed_max_size=16, qk_norm="rms_norm",
    )


def make_flow_scheduler():
    """Rectified-flow Euler sampler, no resolution shift (the images are 64x64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)

"""Tiny SD 1.x / 2.x / SDXL pipelines with random weights, for tests.

Each is built from a config, saved with ``save_pretrained`` (safetensors) and
loaded back with ``from_pretrained``: the real loading path. Sizes are small
but keep what matters to attention: several resolutions, cross and self
sites, a mid block, linear projections and per-block head dims (SD 2.x),
two text encoders and added conditioning (SDXL).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from xattn.assets import clip_tokenizer_path

TEXT_DIM = 32


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(clip_tokenizer_path())


def _text_config(hidden: int = TEXT_DIM, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=projection or hidden,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd1_unet(cross_dim: int = TEXT_DIM) -> UNet2DConditionModel:
    """SD 1.x layout: conv projections, one head count for all blocks."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=8,
    )


def sd2_unet(cross_dim: int = TEXT_DIM) -> UNet2DConditionModel:
    """SD 2.x layout: linear projections, per-block head dims, upcast attention."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(4, 8, 8), use_linear_projection=True,
        upcast_attention=True, norm_num_groups=8,
    )


def sdxl_unet(cross_dim: int = 2 * TEXT_DIM) -> UNet2DConditionModel:
    """SDXL layout: text_time added conditioning, several transformer layers per block."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + TEXT_DIM, norm_num_groups=8,
    )


def build_sd(path: Path, unet: UNet2DConditionModel, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=tokenizer(), unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_sdxl(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=TEXT_DIM)),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=sdxl_unet(), scheduler=_scheduler(),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def load_sd(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_sdxl(path: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- IP-Adapter: a tiny one with random weights, loaded through diffusers' own loader -------------

IMAGE_EMBED_DIM = 16  # the tiny CLIP vision encoder's projection


def ip_adapter_state_dict(unet: UNet2DConditionModel, seed: int = 0, weight: float = 0.5) -> dict:
    """An IP-Adapter checkpoint for ``unet`` in the original layout (``image_proj`` / ``ip_adapter``).

    ``image_proj``: ImageProjection (4 image tokens from an ``IMAGE_EMBED_DIM``
    image embedding); ``ip_adapter``: ``<id>.to_k_ip`` / ``to_v_ip`` per cross
    site, ids 1, 3, 5... in ``unet.attn_processors`` order, as diffusers reads them.
    """
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * weight

    image_proj = {"proj.weight": rand(4 * cross, IMAGE_EMBED_DIM), "proj.bias": rand(4 * cross),
                  "norm.weight": 1 + rand(cross), "norm.bias": rand(cross)}
    ip_layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
        ip_layers[f"{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        ip_layers[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def image_encoder():
    """A tiny CLIPVisionModelWithProjection (32 x 32 images) and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=IMAGE_EMBED_DIM)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def add_ip_adapter(pipe, adapters: int = 1, seed: int = 0):
    """Load ``adapters`` tiny random IP-Adapters into ``pipe`` (UNet processors, projection, image encoder)."""
    torch.manual_seed(seed)
    encoder, processor = image_encoder()
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet, seed + a) for a in range(adapters)],
                                       low_cpu_mem_usage=False)
    return pipe


def save_unet_lora(pipe, folder: Path, seed: int = 0) -> Path:
    """A random rank-4 LoRA on ``pipe``'s UNet attention projections, saved in diffusers' layout (safetensors)."""
    import peft
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


# -- Sana: a tiny Gemma tokenizer and encoder, built offline, in a SanaPipeline ---------------------

GEMMA_WORDS = ("a an the red blue green circle square triangle and on of photo cat cats dog in with big small "
               "painting picture house tree sky user prompt given draw it").split()
SANA_TEXT_DIM = 16


def gemma_tokenizer(vocab_size: int = 160):
    """Gemma's tokenizer (transformers' ``GemmaTokenizer``: BPE, spaces as ``▁``, ``<bos>`` first, no end token)
    with a vocabulary and merges trained by ``tokenizers`` on a short word list: most words are one piece
    (``▁circle``), some several (``red``: ``▁``, ``re``, ``d``), unknown ones letter by letter."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    corpus = [" ".join(GEMMA_WORDS[i:i + 5]) for i in range(len(GEMMA_WORDS))] + [" ".join(GEMMA_WORDS)] * 3
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'-\n\u2581")
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
        initial_alphabet=alphabet, show_progress=False))
    state = json.loads(core.to_str())["model"]
    return GemmaTokenizer(vocab=state["vocab"], merges=[tuple(m) for m in state["merges"]], add_bos_token=True)


def gemma_encoder(vocab_size: int = 160, seed: int = 3):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=vocab_size, hidden_size=SANA_TEXT_DIM, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2Model(config).eval()


def build_sana(path: Path, seed: int = 0, qk_norm: str | None = None) -> Path:
    """A SanaPipeline: 2 blocks (linear self-attention, cross-attention), a 4x DC-AE, flow-matching DPM++."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=SANA_TEXT_DIM, sample_size=16, patch_size=1, qk_norm=qk_norm)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types="ResBlock",
                        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8, 8),
                        decoder_block_out_channels=(8, 8, 8), encoder_layers_per_block=(1, 1, 1),
                        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
                        decoder_qkv_multiscales=((), (), ()), downsample_block_type="conv",
                        upsample_block_type="interpolate", scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    SanaPipeline(tokenizer=gemma_tokenizer(), text_encoder=gemma_encoder(), vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    return path


def load_sana(path: Path):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoder_input_ids(pipe, prompt, **options) -> tuple[list[int], torch.Tensor]:
    """The ids ``pipe.text_encoder`` received for ``prompt``'s conditional text, and the embeddings
    ``pipe.encode_prompt(prompt, do_classifier_free_guidance=False, **options)`` returned."""
    seen = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).clone()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            embeds = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, **options)[0]
    finally:
        handle.remove()
    return seen[0][0].tolist(), embeds

"""Tiny SD3 / Flux transformers, their inputs, and joint attention written out in float64.

The reference shares nothing with xattn or the stock processors but the
module's weights: projections, QK norms, the joint concatenation, rotary
embeddings, the softmax and the output split are written here again.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

TEXT_DIM = 12


def sd3_model(folder: Path) -> SD3Transformer2DModel:
    """Two joint blocks (the last one context_pre_only), SD3.5's extra self-attention in the first, QK norms."""
    torch.manual_seed(0)
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).save_pretrained(folder)
    return SD3Transformer2DModel.from_pretrained(folder).eval()


def flux_model(folder: Path) -> FluxTransformer2DModel:
    """One double-stream and one single-stream block, rotary embeddings on three axes."""
    torch.manual_seed(1)
    FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).save_pretrained(folder)
    return FluxTransformer2DModel.from_pretrained(folder).eval()


def sd3_inputs(seed: int, latent_hw=(8, 12), text: int = 7, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, *latent_hw, generator=generator),
                encoder_hidden_states=torch.randn(batch, text, TEXT_DIM, generator=generator),
                pooled_projections=torch.randn(batch, 8, generator=generator), timestep=torch.tensor([500.0] * batch))


def flux_inputs(seed: int, grid=(3, 5), text: int = 7, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rows, columns = grid
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return dict(hidden_states=torch.randn(batch, rows * columns, 8, generator=generator),
                encoder_hidden_states=torch.randn(batch, text, TEXT_DIM, generator=generator),
                pooled_projections=torch.randn(batch, 8, generator=generator), timestep=torch.tensor([0.5] * batch),
                img_ids=ids.view(-1, 3), txt_ids=torch.zeros(text, 3))


@contextmanager
def recording(model, names):
    """Record each named attention module's inputs and output: name -> dict."""
    modules = dict(model.named_modules())
    records, handles = {}, []
    for name in names:
        def before(module, args, kwargs, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            records[name] = {"hidden": hidden, "context": kwargs.get("encoder_hidden_states"),
                             "rope": kwargs.get("image_rotary_emb")}

        def after(module, args, kwargs, output, name=name):
            records[name]["output"] = output

        handles.append(modules[name].register_forward_pre_hook(before, with_kwargs=True))
        handles.append(modules[name].register_forward_hook(after, with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotary embedding on [b, h, s, d] with (cos, sin) [s, d], pairs (x0, x1) interleaved."""
    cos, sin = (t.double()[None, None] for t in rope)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def reference(attn, record: dict, *, family: str, text_first: bool, image_tokens: int | None = None,
              bias=None, weights=None, borrow=None, context_scale: float = 1.0) -> dict:
    """float64 joint attention of one module on recorded inputs: scores/probs blocks and the module output.

    ``bias`` / ``weights`` [b, j_text] act on the image->text block; ``borrow`` [b]
    gives row r row borrow[r]'s queries and keys; ``context_scale`` scales the text
    hidden states first. A module without text (``image_tokens is None`` and no
    context) is a self site: the block is the whole map.
    """
    m = copy.deepcopy(attn).double()
    x, c = record["hidden"].double(), record["context"]
    c = None if c is None else c.double() * context_scale
    heads = m.heads
    batch = x.shape[0]

    def split(t):  # [b, s, h*d] -> [b, h, s, d]
        return t.view(batch, t.shape[1], heads, -1).transpose(1, 2)

    single = c is None and image_tokens is not None
    if single:  # Flux single stream: [text, image] in one sequence
        text_tokens = x.shape[1] - image_tokens
        x = torch.cat([x[:, :text_tokens] * context_scale, x[:, text_tokens:]], dim=1)
    q, k, v = split(m.to_q(x)), split(m.to_k(x)), split(m.to_v(x))
    if m.norm_q is not None:
        q, k = m.norm_q(q), m.norm_k(k)
    if c is not None:
        cq, ck, cv = split(m.add_q_proj(c)), split(m.add_k_proj(c)), split(m.add_v_proj(c))
        if m.norm_added_q is not None:
            cq, ck = m.norm_added_q(cq), m.norm_added_k(ck)
        pair = (lambda a, b: torch.cat([b, a], dim=2)) if text_first else (lambda a, b: torch.cat([a, b], dim=2))
        q, k, v = pair(q, cq), pair(k, ck), pair(v, cv)
    if record["rope"] is not None:
        q, k = _rotate(q, record["rope"]), _rotate(k, record["rope"])
    length = q.shape[2]
    if c is None and not single:
        rows = columns = slice(0, length)
    else:
        images = x.shape[1] if not single else image_tokens
        texts = length - images
        if text_first:
            rows, columns = slice(texts, length), slice(0, texts)
        else:
            rows, columns = slice(0, images), slice(images, length)
    if borrow is not None:
        q, k = q[borrow], k[borrow]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [b, h, s, s]
    if bias is not None:
        scores[:, :, rows, columns] += bias.double()[:, None, None, :]
    probs = scores.softmax(dim=-1)
    if weights is not None:
        probs[:, :, rows, columns] *= weights.double()[:, None, None, :]
    out = (probs @ v).transpose(1, 2).reshape(batch, length, -1)  # [b, s, h*d]
    if family == "flux" and c is None:
        output = out  # single stream: the block projects it
    elif c is None:
        output = m.to_out[0](out)
    else:
        texts = c.shape[1]
        text_out, image_out = (out[:, :texts], out[:, texts:]) if text_first else (out[:, -texts:], out[:, :-texts])
        if family == "flux" or not m.context_pre_only:
            text_out = m.to_add_out(text_out)
        output = (m.to_out[0](image_out), text_out)
    return {"scores": scores[:, :, rows, columns], "probs": probs[:, :, rows, columns], "output": output,
            "whole": probs, "rows": rows, "columns": columns}  # the whole joint softmax, image rows, text columns


def max_difference(got, expected) -> float:
    """Largest |got - expected| over a tensor or a tuple of tensors."""
    if isinstance(got, tuple):
        return max(max_difference(g, e) for g, e in zip(got, expected))
    return (got.double() - expected).abs().max().item()


def sd3_pipeline(folder: Path):
    """A tiny StableDiffusion3Pipeline: CLIP-L and CLIP-G (random weights), no T5 (its part of the text is zeros)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tiny_models import tokenizer

    def clip(seed: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            projection_dim=16, hidden_act="gelu"))

    torch.manual_seed(2)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035, sample_size=16)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip(3),
        tokenizer=tokenizer(), text_encoder_2=clip(4), tokenizer_2=tokenizer(), text_encoder_3=None, tokenizer_3=None,
    ).save_pretrained(folder)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None, image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe

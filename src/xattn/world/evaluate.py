"""Scores for a shapes-world pipeline: generation, localisation, reweighting.

Why: the world's ground truth turns "the maps look right" into numbers.  All
measurements use fixed seeds and the held-out split, and read images with the
rule-based segmenter, so a result can be rerun and checked exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import image_to_tensor, object_slots
from .grounding import ProbeStore, install
from .scenes import COLORS, SHAPES, Scene, heldout_prompts, heldout_scenes
from .segment import classify_shape, components, largest_component, segment

MIN_BLOB = 40  # pixels a named colour needs to count as present


def parse_caption(caption: str) -> list[tuple[str, str]]:
    words = caption.split()
    return [(words[i], words[i + 1]) for i in range(len(words) - 1)
            if words[i] in COLORS and words[i + 1] in SHAPES]


def generate(pipe, prompt: str, seeds: list[int], guidance: float, steps: int,
             cross_attention_kwargs=None) -> np.ndarray:
    """uint8 [n, 64, 64, 3]; one CPU generator per seed, so each image is fixed."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt, num_images_per_prompt=len(seeds), generator=gens, guidance_scale=guidance,
               num_inference_steps=steps, output_type="np", cross_attention_kwargs=cross_attention_kwargs)
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def foreground(image: np.ndarray) -> np.ndarray:
    """Non-white pixels that are close to some palette colour."""
    return np.any([segment(image, c) for c in COLORS], axis=0)


def dominant_color(image: np.ndarray) -> str | None:
    counts = {c: int(largest_component(segment(image, c)).sum()) for c in COLORS}
    best = max(counts, key=counts.get)
    return best if counts[best] >= MIN_BLOB else None


@dataclass
class GenerationScores:
    color_acc: float  # single objects: the dominant colour is the named one
    shape_acc: float  # single objects: the foreground blob has the named shape
    both_colors: float  # pairs: both named colours present (largest blob >= MIN_BLOB px)
    one_object: float  # single objects: exactly one foreground blob >= MIN_BLOB px
    pair_binding: float  # pairs: named objects whose colour blob has the named shape
    n_single: int
    n_pair: int


def generation_scores(pipe, seeds: list[int], guidance: float, steps: int,
                      singles: list[str] | None = None, pairs: list[str] | None = None) -> GenerationScores:
    if singles is None or pairs is None:
        s, p = heldout_prompts(n_pair=16)
        singles = s if singles is None else singles
        pairs = p if pairs is None else pairs
    color_ok, shape_ok, both_ok, one_ok, bind_ok = [], [], [], [], []
    for prompt in singles:
        (color, shape), = parse_caption(prompt)
        for img in generate(pipe, prompt, seeds, guidance, steps):
            color_ok.append(dominant_color(img) == color)
            shape_ok.append(classify_shape(foreground(img)) == shape)
            one_ok.append(sum(c.sum() >= MIN_BLOB for c in components(foreground(img))) == 1)
    for prompt in pairs:
        named = parse_caption(prompt)
        for img in generate(pipe, prompt, seeds, guidance, steps):
            both_ok.append(all(largest_component(segment(img, c)).sum() >= MIN_BLOB for c, _ in named))
            bind_ok.extend(classify_shape(segment(img, c), min_pixels=MIN_BLOB) == shp for c, shp in named)
    def rate(xs):
        return float(np.mean(xs)) if xs else float("nan")

    return GenerationScores(rate(color_ok), rate(shape_ok), rate(both_ok), rate(one_ok), rate(bind_ok),
                            len(color_ok), len(both_ok))


# ---------------------------------------------------------------- localisation

@torch.no_grad()
def word_maps(pipe, scene: Scene, timesteps=(300, 500, 700), seed: int = 0,
              resolutions=(16, 8)) -> torch.Tensor:
    """Mean cross-attention map per token on a ground-truth scene: [77, 64, 64].

    The scene is encoded, noised at each timestep (fixed seed) and denoised
    once with its caption; head-averaged probabilities of the cross layers at
    the given latent resolutions are upsampled to 64x64 and averaged.
    """
    unet, vae, sf = pipe.unet, pipe.vae, pipe.vae.config.scaling_factor
    saved = unet.attn_processors
    store: ProbeStore = install(unet)
    try:
        ids = pipe.tokenizer(scene.caption, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        enc = pipe.text_encoder(ids)[0]  # [1, 77, hidden]
        lat = vae.encode(image_to_tensor(scene.image[None])).latent_dist.mean * sf
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(77, 64, 64)
        count = 0
        for t in timesteps:
            noise = torch.randn(lat.shape, generator=gen)
            tt = torch.tensor([t])
            noisy = pipe.scheduler.add_noise(lat, noise, tt)
            store.clear()
            unet(noisy, tt, enc)
            for probs in store.probs:  # [1, heads, pixels, 77]
                res = int(round(probs.shape[2] ** 0.5))
                if res not in resolutions:
                    continue
                m = probs[0].mean(0).T.reshape(77, 1, res, res)  # [77, 1, res, res]
                total += F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
                count += 1
        return total / max(count, 1)
    finally:
        unet.set_attn_processor(saved)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


@dataclass
class LocalisationScores:
    win_rate: float  # own-object mean attention > other object's, colour + shape words
    iou_own: float  # map thresholded at half its max vs own mask
    iou_other: float  # same map vs the other object's mask
    n_words: int


def localisation_scores(pipe, scenes: list[Scene] | None = None, n: int = 16,
                        timesteps=(300, 500, 700)) -> LocalisationScores:
    scenes = heldout_scenes(n) if scenes is None else scenes
    wins, own, other = [], [], []
    for k, scene in enumerate(scenes):
        maps = word_maps(pipe, scene, timesteps, seed=k).numpy()
        slots = object_slots(scene)
        for obj_idx, obj in enumerate(scene.objects):
            rival = scene.objects[1 - obj_idx]
            for slot in slots[obj_idx]:
                m = maps[slot]
                wins.append(m[obj.mask].mean() > m[rival.mask].mean())
                binary = m >= 0.5 * m.max()
                own.append(_iou(binary, obj.mask))
                other.append(_iou(binary, rival.mask))
    return LocalisationScores(float(np.mean(wins)), float(np.mean(own)), float(np.mean(other)), len(wins))


# ---------------------------------------------------------------- reweighting

class ScaleTokenProcessor:
    """Cross-attention that multiplies chosen tokens' post-softmax probabilities.

    Only the conditional half of a classifier-free-guidance batch (the second
    half, as diffusers stacks [uncond, cond]) is changed.
    """

    def __init__(self, weights: dict[int, float], cfg: bool = True) -> None:
        self.weights = weights
        self.cfg = cfg

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs):
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)  # [b, h, i, d]
        k = attn.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)  # [b, h, j, d]
        v = attn.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)  # [b, h, j, d]
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # [b, h, i, j]
        start = b // 2 if self.cfg else 0
        scale = torch.ones(probs.shape[-1])
        for slot, w in self.weights.items():
            scale[slot] = w
        probs = torch.cat([probs[:start], probs[start:] * scale], dim=0)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)  # [b, i, h*d]
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def color_pixels(image: np.ndarray, color: str) -> int:
    return int(segment(image, color).sum())


def reweight_curve(pipe, prompts: list[str], seeds: list[int], guidance: float, steps: int,
                   weights=(0.0, 0.5, 1.0, 2.0, 4.0)) -> dict[float, float]:
    """Pixels of the first-named colour at each weight of its word, / pixels at weight 1.

    The weight multiplies that token's post-softmax attention at every cross
    layer and step (conditional branch only).  Returns pooled ratios.
    """
    unet = pipe.unet
    saved = unet.attn_processors
    totals = {w: 0 for w in weights}
    try:
        for prompt in prompts:
            color = parse_caption(prompt)[0][0]
            slot = prompt.split().index(color) + 1
            for w in weights:
                procs = {name: ScaleTokenProcessor({slot: w}, cfg=guidance > 1) if ".attn2." in name
                         else p for name, p in saved.items()}
                unet.set_attn_processor(procs)
                imgs = generate(pipe, prompt, seeds, guidance, steps)
                totals[w] += sum(color_pixels(img, color) for img in imgs)
    finally:
        unet.set_attn_processor(saved)
    base = max(totals.get(1.0, 0), 1)
    return {w: totals[w] / base for w in weights}

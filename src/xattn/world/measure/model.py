"""The model card's figures for a shapes-world pipeline: generation, localisation, weight 0.

Why: the world's ground truth turns "the maps look right" into numbers. The
maps are read with xattn's own :class:`~xattn.Capture` and the weights set
with its :class:`~xattn.Reweight`, so these figures measure the product, not a
private probe; images are read with :mod:`.pixels`. Fixed seeds, held-out
split, so every figure can be rerun exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch

from ..data import image_to_tensor, object_slots
from ..scenes import TRAIN_COMBOS, Scene, heldout_prompts, heldout_scenes
from .pixels import (MIN_BLOB, classify_shape, components, dominant_color, drawn_as_named, foreground, mask_iou,
                     object_mask, object_words, segment)


def generate(pipe, prompt: str, seeds: list[int], guidance: float, steps: int) -> np.ndarray:
    """uint8 [n, 64, 64, 3]; one CPU generator per seed, so each image is fixed."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt, num_images_per_prompt=len(seeds), generator=gens, guidance_scale=guidance,
               num_inference_steps=steps, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


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
    """Colour, shape, one-object, both-colours and binding rates (default: the held-out prompts)."""
    if singles is None or pairs is None:
        s, p = heldout_prompts(n_pair=16)
        singles = s if singles is None else singles
        pairs = p if pairs is None else pairs
    color_ok, shape_ok, both_ok, one_ok, bind_ok = [], [], [], [], []
    for prompt in singles:
        (color, shape), = object_words(prompt)
        for img in generate(pipe, prompt, seeds, guidance, steps):
            color_ok.append(dominant_color(img) == color)
            shape_ok.append(classify_shape(foreground(img)) == shape)
            one_ok.append(sum(c.sum() >= MIN_BLOB for c in components(foreground(img))) == 1)
    for prompt in pairs:
        named = object_words(prompt)
        for img in generate(pipe, prompt, seeds, guidance, steps):
            both_ok.append(all(object_mask(img, c).sum() >= MIN_BLOB for c, _ in named))
            bind_ok.extend(classify_shape(segment(img, c), min_pixels=MIN_BLOB) == shp for c, shp in named)

    def rate(xs):
        return float(np.mean(xs)) if xs else float("nan")

    return GenerationScores(rate(color_ok), rate(shape_ok), rate(both_ok), rate(one_ok), rate(bind_ok),
                            len(color_ok), len(both_ok))


def pair_captions() -> list[str]:
    """Two-object captions of training combinations with distinct colours and distinct shapes, both orders."""
    return [f"a {c1} {s1} and a {c2} {s2}" for (c1, s1), (c2, s2) in permutations(TRAIN_COMBOS, 2)
            if c1 != c2 and s1 != s2]


def caption_fidelity(pipe, captions: list[str], seeds: list[int], guidance: float, steps: int) -> dict[str, list[bool]]:
    """For each caption, whether each seed's image is drawn as named (:func:`.pixels.drawn_as_named`)."""
    return {caption: [drawn_as_named(img, caption) for img in generate(pipe, caption, seeds, guidance, steps)]
            for caption in captions}


# ---------------------------------------------------------------- localisation

@torch.no_grad()
def scene_word_maps(pipe, scene: Scene, slots: list[int], timesteps=(300, 500, 700), seed: int = 0,
                    resolutions: tuple[int, ...] | None = None, size=(64, 64)) -> dict[int, np.ndarray]:
    """Mean cross-attention map of each token slot on a ground-truth scene: slot -> [64, 64].

    The scene is encoded, noised at each timestep (noise from ``seed``) and
    denoised once with its caption, one row per timestep, under a
    :class:`~xattn.Capture`; head-averaged maps of the cross sites at the
    given map sizes (default: the UNet's 16x16 and 8x8 levels, the transformer's
    8x8 patch grid) are upsampled and averaged over sites and timesteps.
    """
    from ...capture import Capture
    from ...session import hooks

    rows = len(timesteps)
    capture = Capture()
    denoise = denoiser_call(pipe, scene, timesteps, seed)  # encoded outside the session: a bare denoiser call
    resolutions = resolutions or ((8,) if hasattr(pipe, "transformer") else (16, 8))
    with hooks(pipe, capture, prompts=[scene.caption] * rows):
        denoise()
    maps = capture.maps()
    out = {}
    for slot in slots:
        total, count = 0.0, 0
        for row in range(rows):
            for res in resolutions:
                part, calls = maps.word_total(slot, row, 0, res=res, size=size, upsample="bilinear")
                total, count = total + part, count + calls
        out[slot] = (total / max(count, 1)).numpy()
    return out


@torch.no_grad()
def scene_concept_maps(pipe, scene: Scene, concepts: list[str], timesteps=(300, 500, 700), seed: int = 0,
                       size=(64, 64), kind: str = "output", blocks: list[int] | None = None) -> dict[str, np.ndarray]:
    """ConceptAttention maps of ``concepts`` on a ground-truth scene: concept -> [64, 64].

    The same noised inputs as :func:`scene_word_maps` (same seeds), one
    transformer call under :func:`xattn.concepts`; maps are the softmax over
    the concepts, averaged over blocks and timesteps, upsampled bilinearly.
    """
    from ...concepts import concepts as concept_maps

    denoise = denoiser_call(pipe, scene, timesteps, seed)
    with concept_maps(pipe, concepts, blocks=blocks) as found:
        denoise()
    maps = found.maps(kind).mean(0)  # [k, h, w]: the rows are the timesteps
    up = torch.nn.functional.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    return {concept: up[n].numpy() for n, concept in enumerate(concepts)}


def _noise(latent: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(latent.shape, generator=gen) for _ in range(rows)])  # [T, C, h, w]


def denoiser_call(pipe, scene: Scene, timesteps, seed: int):
    """A no-argument call of the denoiser on the scene, noised at each timestep (one row each), with its caption."""
    return (_dit_call if hasattr(pipe, "transformer") else _unet_call)(pipe, scene, timesteps, seed)


def _unet_call(pipe, scene: Scene, timesteps, seed: int):
    ids = pipe.tokenizer(scene.caption, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]  # [1, 77, d]
    latent = pipe.vae.encode(image_to_tensor(scene.image[None])).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = _noise(latent, len(timesteps), seed)
    noisy = torch.cat([pipe.scheduler.add_noise(latent, noise[k:k + 1], torch.tensor([t]))
                       for k, t in enumerate(timesteps)])  # [T, C, h, w]
    return lambda: pipe.unet(noisy, torch.tensor(timesteps), text.expand(len(timesteps), -1, -1))


def _dit_call(pipe, scene: Scene, timesteps, seed: int):
    """The same on a flow-matching transformer: x_t = (1 - t) x_0 + t noise, with t = timestep / 1000."""
    text, _, pooled, _ = pipe.encode_prompt(scene.caption, None, None, do_classifier_free_guidance=False)
    vae = pipe.vae.config
    latent = pipe.vae.encode(image_to_tensor(scene.image[None])).latent_dist.mean
    latent = (latent - (vae.shift_factor or 0.0)) * vae.scaling_factor
    sigma = torch.tensor(timesteps, dtype=torch.float32)[:, None, None, None] / 1000
    noisy = (1 - sigma) * latent + sigma * _noise(latent, len(timesteps), seed)
    rows = len(timesteps)
    return lambda: pipe.transformer(noisy, text.expand(rows, -1, -1), pooled.expand(rows, -1),
                                    torch.tensor(timesteps, dtype=torch.float32))


@dataclass
class LocalisationScores:
    win_rate: float  # own-object mean attention > other object's, colour + shape words
    iou_own: float  # map thresholded at half its max vs own mask
    iou_other: float  # same map vs the other object's mask
    n_words: int


def localisation_scores(pipe, scenes: list[Scene] | None = None, n: int = 16,
                        timesteps=(300, 500, 700)) -> LocalisationScores:
    """Where the colour and shape words of ground-truth two-object scenes attend, against their masks."""
    scenes = heldout_scenes(n) if scenes is None else scenes
    wins, own, other = [], [], []
    for k, scene in enumerate(scenes):
        slots = object_slots(scene)
        maps = scene_word_maps(pipe, scene, [s for pair in slots for s in pair], timesteps, seed=k)
        for obj_idx, obj in enumerate(scene.objects):
            rival = scene.objects[1 - obj_idx]
            for slot in slots[obj_idx]:
                m = maps[slot]
                wins.append(m[obj.mask].mean() > m[rival.mask].mean())
                binary = m >= 0.5 * m.max()
                own.append(mask_iou(binary, obj.mask))
                other.append(mask_iou(binary, rival.mask))
    return LocalisationScores(float(np.mean(wins)), float(np.mean(own)), float(np.mean(other)), len(wins))


# ---------------------------------------------------------------- reweighting

def reweight_curve(pipe, prompts: list[str], seeds: list[int], guidance: float, steps: int,
                   weights=(0.0, 0.5, 1.0, 2.0, 4.0)) -> dict[float, float]:
    """Pixels of the first-named colour at each weight of its word, / pixels at weight 1.

    The weight is xattn's :class:`~xattn.Reweight` in ``scale`` mode: it
    multiplies that word's post-softmax attention at every cross site and
    step, on the conditional rows only. Returns ratios pooled over prompts and seeds.
    """
    from ...reweight import Reweight
    from ...session import hooks

    totals = {w: 0 for w in weights}
    for prompt in prompts:
        color = object_words(prompt)[0][0]
        for w in weights:
            with hooks(pipe, Reweight({color: w}, mode="scale")):
                imgs = generate(pipe, prompt, seeds, guidance, steps)
            totals[w] += sum(int(segment(img, color).sum()) for img in imgs)
    base = max(totals.get(1.0, 0), 1)
    return {w: totals[w] / base for w in weights}

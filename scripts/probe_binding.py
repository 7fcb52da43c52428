#!/usr/bin/env python
"""Where does a blob's shape come from, and how far can attention move it? Probes on the shapes world.

For the held-out two-object captions (``a red circle and a blue square``), each
probe changes one thing and reports binding (each colour's blob has its named
shape), both colours drawn, whether the images draw the shapes swapped, and
whether a blob takes the shape of the noun its half of the image may see (these
two over the captions whose shapes differ):

- ``plain``: the caption as it is;
- ``swap-nouns``: the two noun slots of ``prompt_embeds`` taken from the caption
  with its shapes swapped (``a red square and a blue circle``);
- ``swap-end``: the end and padding slots taken from that caption instead;
- ``end-substitution``: the end and padding slots taken from the caption
  without its colours (ToMe's end-token substitution, Hu et al. 2024);
- ``mask-nouns``: in every cross-attention layer, at every step, the left
  half's queries cannot see the second noun and the right half's the first
  (conditional rows; an upper bound for what a map loss can enforce);
- ``mask-pairs``: the same for both words of each pair;
- ``mask-pairs-self``: and self-attention kept inside each half;
- ``regions``: each half conditioned on its own phrase alone, encoded whole.

The figures are in docs/guidance.md (binding). One torch thread.

    python scripts/probe_binding.py                       # every probe, seeds 0-1
    python scripts/probe_binding.py --probes plain,mask-nouns --seeds 4
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

PROBES = ["plain", "swap-nouns", "swap-end", "end-substitution", "mask-nouns", "mask-pairs", "mask-pairs-self",
          "regions"]
MASKED = -1e4  # a logit that softmax turns into zero weight


class HalvesProcessor:
    """Attention where the left and right halves of the image see different keys (conditional rows only).

    ``hidden(side)`` gives, for the left half's and the right half's queries, the key slots they may not
    see at a cross-attention layer; at a self-attention layer with ``self_halves``, keys of the other half.
    ``phrases`` instead gives each half its own text (``regions``).
    """

    def __init__(self, cross: bool, state: dict, self_halves: bool = False):
        self.cross, self.state, self.self_halves = cross, state, self_halves

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        batch, n, _ = hidden_states.shape
        side = math.isqrt(n)
        left = (torch.arange(n) % side) < side // 2  # [n]: queries in the left half
        cond = slice(batch // 2, batch)  # classifier-free guidance: [unconditional, conditional]
        context = encoder_hidden_states if self.cross else hidden_states
        if self.cross and self.state.get("phrases") is not None:
            outs = [self._attend(attn, hidden_states, torch.cat([context[:batch // 2],
                                                                 phrase.expand(batch - batch // 2, -1, -1)]))
                    for phrase in self.state["phrases"]]
            mask = left.view(1, n, 1).to(outs[0].dtype)
            out = self._attend(attn, hidden_states, context)
            out[cond] = mask * outs[0][cond] + (1 - mask) * outs[1][cond]
            return out
        bias = torch.zeros(batch, 1, n, context.shape[1])
        if self.cross and self.state.get("hidden") is not None:
            hidden_left, hidden_right = self.state["hidden"]
            for slot in hidden_left:
                bias[cond, 0, left, slot] = MASKED
            for slot in hidden_right:
                bias[cond, 0, ~left, slot] = MASKED
        elif not self.cross and self.self_halves:
            bias[cond, 0] = torch.where(left[:, None] == left[None, :], 0.0, MASKED)
        return self._attend(attn, hidden_states, context, bias)

    @staticmethod
    def _attend(attn, hidden_states, context, bias=None):
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return attn.to_out[1](attn.to_out[0](out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated, of {', '.join(PROBES)}")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per caption")
    parser.add_argument("--captions", type=int, default=16, help="the first N held-out pair captions")
    args = parser.parse_args(argv)
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        parser.error(f"unknown probes {unknown}; choose from {', '.join(PROBES)}")
    torch.set_num_threads(1)

    import xattn
    from diffusers import StableDiffusionPipeline

    from xattn.world import heldout_prompts, measure

    pipe = StableDiffusionPipeline.from_pretrained(xattn.world.model_path())
    pipe.set_progress_bar_config(disable=True)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    _, pairs = heldout_prompts(n_pair=16)
    seeds = list(range(args.seeds))

    @torch.no_grad()
    def encode(text: str) -> tuple[torch.Tensor, int]:
        """``[77, d]`` embeddings and the slot of the end token."""
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids)[0][0], int((ids[0] == tokenizer.eos_token_id).nonzero()[0])

    state: dict = {}
    stock = dict(pipe.unet.attn_processors)
    print(f"{'probe':<18} binding  both colours  swapped  blob has its half's noun  images (two shapes)")
    for probe in probes:
        state.clear()
        masked = probe.startswith("mask") or probe == "regions"
        pipe.unet.set_attn_processor(
            {name: HalvesProcessor("attn2" in name, state, probe == "mask-pairs-self") for name in stock}
            if masked else dict(stock))
        bound, both, swapped, local = [], [], [], []
        for prompt in pairs[:args.captions]:
            (c1, s1), (c2, s2) = named = measure.object_words(prompt)
            embeds, end = encode(prompt)
            swapped_caption, _ = encode(f"a {c1} {s2} and a {c2} {s1}")  # same slots: a c s and a c s
            embeds = embeds.clone()
            words = prompt.split()
            if len(tokenizer(prompt).input_ids) != len(words) + 2:
                raise SystemExit(f"{prompt!r}: a word of it is not one token; the probes splice slots by word")
            nouns = [1 + words.index(s1), len(words)]  # slots after the start token: "a c1 s1 and a c2 s2"
            if probe == "swap-nouns":
                embeds[nouns] = swapped_caption[nouns]
            elif probe == "swap-end":
                embeds[end:] = swapped_caption[end:]
            elif probe == "end-substitution":
                plain_shapes, plain_end = encode(f"a {s1} and a {s2}")
                embeds[end:] = plain_shapes[plain_end:plain_end + embeds.shape[0] - end]
            elif probe == "mask-nouns":
                state["hidden"] = ([nouns[1]], [nouns[0]])
            elif probe in ("mask-pairs", "mask-pairs-self"):
                state["hidden"] = ([nouns[1] - 1, nouns[1]], [nouns[0] - 1, nouns[0]])
            elif probe == "regions":
                state["phrases"] = [encode(f"a {c1} {s1}")[0], encode(f"a {c2} {s2}")[0]]
            out = pipe(prompt_embeds=embeds[None], num_images_per_prompt=len(seeds), guidance_scale=4.0,
                       num_inference_steps=25, output_type="np",
                       generator=[torch.Generator().manual_seed(s) for s in seeds]).images
            for image in (np.clip(out, 0, 1) * 255).round().astype(np.uint8):
                shapes = [measure.classify_shape(measure.segment(image, c), min_pixels=measure.MIN_BLOB)
                          for c, _ in named]
                bound += [got == want for got, (_, want) in zip(shapes, named)]
                both.append(all(measure.object_mask(image, c).sum() >= measure.MIN_BLOB for c, _ in named))
                if s1 == s2:  # a pair of one shape: nothing to swap, no half's noun to follow
                    continue
                swapped.append(shapes == [s2, s1])
                for (colour, _), shape in zip(named, shapes):
                    blob = measure.segment(image, colour)
                    if blob.sum() >= measure.MIN_BLOB:
                        _, x = measure.centroid(blob)
                        local.append(shape == (s1 if x < image.shape[1] / 2 else s2))
        print(f"{probe:<18} {np.mean(bound):7.2f}  {np.mean(both):12.2f}  {np.mean(swapped):7.2f}  "
              f"{np.mean(local):24.2f}  {len(both)} ({len(swapped)})", flush=True)
    pipe.unet.set_attn_processor(stock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""compel's embedding formula for the compel dialect (SD 1.x/2.x, one 77-slot window as compel's default).

Restated from compel's documentation: a weight ``w`` moves a token's embedding
away from the empty prompt's, ``e' = e_empty + w · (e - e_empty)`` (tokens at
weight 1 keep ``e``). A fragment under 1 also blends the result towards the
embedding of the prompt with that fragment masked out, with blend weight
``tan((1 - w) · π/2)`` against 1 for the prompt itself (``w = 0.5`` is half way;
``w → 0`` removes the fragment). Prompts longer than 75 tokens are cut, as
compel does by default.
"""

from __future__ import annotations

import math

import torch

from .chunks import CHUNK_SLOTS, CHUNK_TOKENS
from .types import WeightedPrompt

_SMALLEST_WEIGHT = 1e-5  # compel's floor, so that tan() stays finite


@torch.no_grad()
def compel_embeds(tokenizer, text_encoder, prompt: WeightedPrompt) -> torch.Tensor:
    """``[1, 77, d]`` embeddings of a compel-dialect prompt in compel's formula."""
    fragments = [(f.text, f.weight) for f in prompt.fragments if not f.is_break]
    ids, weights, owner = [], [], []
    for index, (text, weight) in enumerate(fragments):
        tokens = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
        ids += tokens
        weights += [weight] * len(tokens)
        owner += [index] * len(tokens)
    ids, weights, owner = ids[:CHUNK_TOKENS], weights[:CHUNK_TOKENS], owner[:CHUNK_TOKENS]
    padding = CHUNK_SLOTS - 2 - len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * padding
    weight = torch.tensor([1.0, *weights, 1.0] + [1.0] * padding)[None, :, None]  # [1, 77, 1]
    owner = torch.tensor([-1, *owner, -1] + [-1] * padding)
    device = text_encoder.device
    tokens = torch.tensor([ids], device=device)
    empty = text_encoder(torch.tensor([[tokenizer.bos_token_id, tokenizer.eos_token_id] + [pad] * (CHUNK_SLOTS - 2)],
                                      device=device))[0]

    def weighted(mask: torch.Tensor) -> torch.Tensor:
        z = text_encoder(tokens, attention_mask=mask[None].to(device))[0]
        w = weight.to(z)
        return torch.where(w == 1, z, empty + (z - empty) * w)

    everything = torch.ones(CHUNK_SLOTS, dtype=torch.long)
    blends, blend_weights = [weighted(everything)], [1.0]
    for index, (_, fragment_weight) in enumerate(fragments):
        if fragment_weight < 1 and bool((owner == index).any()):
            blends.append(weighted(torch.where(owner == index, 0, everything)))
            blend_weights.append(math.tan((1.0 - max(_SMALLEST_WEIGHT, fragment_weight)) * math.pi / 2))
    share = torch.tensor(blend_weights, dtype=blends[0].dtype, device=blends[0].device)
    share = share / share.sum()
    return sum(part * portion for part, portion in zip(blends, share))

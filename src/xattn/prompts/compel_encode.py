"""compel's embedding formula for the compel dialect (SD 1.x/2.x and SDXL), long prompts and operators included.

Restated from compel 2.5.1's documentation and behaviour (an independent implementation):

* a weight ``w`` moves a token's embedding away from the empty prompt's,
  ``e' = e_empty + w · (e - e_empty)`` (tokens at weight 1 keep ``e``);
* a fragment under 1 also blends the result towards the embedding of the prompt
  with that fragment masked out, with blend weight ``tan((1 - w) · π/2)`` against
  1 for the prompt itself (``w = 0.5`` is half way; ``w → 0`` removes it);
* long prompts (compel with ``truncate_long_prompts=False``) are split by
  :func:`xattn.prompts.chunks.place_compel_tokens` into 77-slot windows encoded one
  by one; a masked fragment that crosses a window keeps the windows' first and
  last slot unmasked, as compel does. ``truncate=True`` is compel's default cut;
* ``.blend()``: the prompts' embeddings, padded with empty-prompt windows to the
  longest, summed with their weights (divided by the weights' sum unless
  ``no_normalize``);
* ``.and()`` / ``.add()``: each prompt's embedding (at weight ``w``:
  ``e_empty + w · (e - e_empty)``, every slot) concatenated along the sequence;
* ``.swap()``: the source prompt's embedding, padded to the target's length
  (compel hands the edit to cross-attention control; see
  :func:`xattn.prompts.compel_swap` for running it as an xattn edit);
* SDXL (compel with both tokenizers and encoders, ``PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED``,
  ``requires_pooled=[False, True]``): every step above runs per encoder on its penultimate
  layer (``penultimate=True``, its own empty prompt too), the two results side by side along
  the features; the pooled vector is :func:`compel_pooled` of the prompt *as written*.
"""

from __future__ import annotations

import math

import torch

from .chunks import CHUNK_SLOTS, CHUNK_TOKENS, chunk_ids, place_compel_tokens
from .types import WeightedPrompt

_SMALLEST_WEIGHT = 1e-5  # compel's floor, so that tan() stays finite


@torch.no_grad()
def compel_embeds(tokenizer, text_encoder, prompt: WeightedPrompt, truncate: bool = False,
                  penultimate: bool = False) -> torch.Tensor:
    """``[1, 77k, d]`` embeddings of a compel-dialect prompt in compel's formula.

    ``penultimate``: read the encoder's next-to-last layer without the final norm (SDXL's
    ``PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED``) instead of its normalised last layer (SD 1.x/2.x).
    """
    operator = prompt.operator
    encoder = _Encoder(text_encoder, penultimate)
    if operator is None:
        return _weighted_fragments(tokenizer, encoder, prompt, truncate)
    empty = _empty(tokenizer, encoder)
    if operator.kind == "swap":
        source, target = (_weighted_fragments(tokenizer, encoder, part, truncate) for part in operator.parts)
        return pad_to_same_length([source, target], empty)[0]
    if operator.kind == "blend":
        parts = pad_to_same_length([_weighted_fragments(tokenizer, encoder, part, truncate)
                                    for part in operator.parts], empty)
        weights = torch.tensor(operator.weights, dtype=parts[0].dtype, device=parts[0].device)
        if operator.normalize:
            weights = weights / weights.sum()
        return (torch.cat(parts) * weights[:, None, None]).sum(dim=0, keepdim=True)
    pieces = []
    blank = None
    for part, weight in zip(operator.parts, operator.weights):
        embedding = compel_embeds(tokenizer, text_encoder, part, truncate, penultimate)
        if weight != 1:
            if blank is None:
                blank = _weighted_fragments(tokenizer, encoder, WeightedPrompt("", ()), truncate)
            padded = pad_to_same_length([blank, embedding], empty)[0]
            embedding = padded + (embedding - padded) * weight
        pieces.append(embedding)
    return torch.cat(pieces, dim=1)


def pad_to_same_length(embeddings: list[torch.Tensor], empty: torch.Tensor) -> list[torch.Tensor]:
    """compel's ``pad_conditioning_tensors_to_same_length``: empty-prompt windows appended to the shorter."""
    longest = max(embedding.shape[1] for embedding in embeddings)
    return [torch.cat([embedding] + [empty.to(embedding)] * ((longest - embedding.shape[1]) // CHUNK_SLOTS), dim=1)
            for embedding in embeddings]


@torch.no_grad()
def compel_pooled(tokenizer, text_encoder, text: str) -> torch.Tensor:
    """``[1, d]``: the pooled (projected) output compel returns on SDXL, ``requires_pooled=[False, True]``.

    compel pools the prompt string as written, syntax and all (``a red++ circle`` is read with its
    ``++``, a ``.blend(...)`` with its brackets), cut to one 77-slot window and padded with the pad
    token, without an attention mask and without any weight.
    """
    ids = tokenizer(text, truncation=True, max_length=CHUNK_SLOTS, padding="max_length")["input_ids"]
    output = text_encoder(torch.tensor([ids], device=text_encoder.device))
    return output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output


class _Encoder:
    """A text encoder read at the layer compel is told to return."""

    def __init__(self, text_encoder, penultimate: bool):
        self.text_encoder, self.penultimate, self.device = text_encoder, penultimate, text_encoder.device

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        output = self.text_encoder(ids, attention_mask=attention_mask, output_hidden_states=self.penultimate)
        return output.hidden_states[-2] if self.penultimate else output[0]


def _empty(tokenizer, encoder: _Encoder) -> torch.Tensor:
    """compel's ``empty_z``: ``<start> <end>`` and padding, encoded without a mask."""
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id] + [_pad(tokenizer)] * (CHUNK_SLOTS - 2)
    return encoder(torch.tensor([ids], device=encoder.device))


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _weighted_fragments(tokenizer, text_encoder: _Encoder, prompt: WeightedPrompt, truncate: bool) -> torch.Tensor:
    """compel's ``get_embeddings_for_weighted_prompt_fragments`` for one flat prompt (chunk breaks allowed)."""
    fragments = [(f.text, f.weight) for f in prompt.fragments if not f.is_break] or [("", 1.0)]
    pieces: list = []  # token pieces, None for a chunk break
    owner: list[int] = []  # per token: its fragment in ``fragments``
    number = 0
    for fragment in prompt.fragments:
        if fragment.is_break:
            pieces.append(None)
            continue
        tokens = tokenizer.tokenize(fragment.text)
        owner += [number] * len(tokens)
        pieces += tokens
        number += 1
    layout = place_compel_tokens(pieces, truncate)
    total = layout.num_chunks * CHUNK_SLOTS
    texts = [piece for piece in pieces if piece is not None]
    ids = tokenizer.convert_tokens_to_ids(texts)
    kept = [slot < total for slot in layout.slots]
    rows = chunk_ids([i for i, keep in zip(ids, kept) if keep],
                     type(layout)(tuple(s for s, keep in zip(layout.slots, kept) if keep), layout.chunk_lengths),
                     tokenizer.bos_token_id, tokenizer.eos_token_id, _pad(tokenizer))
    weight = torch.ones(total)
    for token, slot in enumerate(layout.slots):
        if kept[token]:
            weight[slot] = fragments[owner[token]][1]
    tokens_tensor = torch.tensor([sum(rows, [])], device=text_encoder.device)
    empty = _empty(tokenizer, text_encoder)

    def weighted(mask: torch.Tensor) -> torch.Tensor:
        windows = []
        for start in range(0, total, CHUNK_SLOTS):
            window = slice(start, start + CHUNK_SLOTS)
            z = text_encoder(tokens_tensor[:, window], mask[None, window].to(text_encoder.device))
            w = weight[window].to(z)[None, :, None]
            windows.append(z if bool((w == 1).all()) else torch.where(w == 1, z, empty + (z - empty) * w))
        return torch.cat(windows, dim=1)

    everything = torch.ones(total, dtype=torch.long)
    blends, blend_weights = [weighted(everything)], [1.0]
    for index, (start, end) in _fragment_ranges(layout.slots, owner, len(fragments), truncate):
        if fragments[index][1] < 1:
            mask = everything.clone()
            mask[start : end + 1] = 0
            if not truncate:  # compel keeps each window's first and last slot
                mask[0::CHUNK_SLOTS] = 1
                mask[CHUNK_SLOTS - 1 :: CHUNK_SLOTS] = 1
            blends.append(weighted(mask))
            blend_weights.append(math.tan((1.0 - max(_SMALLEST_WEIGHT, fragments[index][1])) * math.pi / 2))
    share = torch.tensor(blend_weights, dtype=blends[0].dtype, device=blends[0].device)
    share = share / share.sum()
    return (torch.cat(blends) * share[:, None, None]).sum(dim=0, keepdim=True)


def _fragment_ranges(slots, owner: list[int], count: int, truncate: bool):
    """``(fragment, (first slot, last slot))`` as compel finds each fragment's tokens in the windows.

    When cut (``truncate``), a fragment whose tokens run past the window ends at slot 76 (the end
    token's, which compel masks with it), and fragments that start past it are not weighted down.
    """
    for index in range(count):
        mine = [slot for slot, own in zip(slots, owner) if own == index]
        if not mine:
            continue
        if truncate and mine[0] >= 1 + CHUNK_TOKENS:
            return
        last = mine[-1] if not truncate or mine[-1] <= CHUNK_TOKENS else CHUNK_SLOTS - 1
        yield index, (mine[0], last)

"""Encode prompts of any length the way A1111 does: 75-token chunks, emphasis, BREAK.

:func:`encode_prompt` returns the ``prompt_embeds`` (and negative, and SDXL's
pooled embeddings) for ``pipe(prompt_embeds=..., ...)``, 77·k slots long. Pass
``embeds.tokenizer`` with the written prompt to ``xattn.hooks(..., prompts=...,
tokenizer=...)`` so that words in chunk 2 map to slots 77 and up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tokens import TokenMap
from .chunks import CHUNK_SLOTS, chunk_ids, place_compel_tokens, place_tokens
from .types import UnsupportedSyntaxError, WeightedPrompt


class LongPromptTokenizer:
    """A pipeline tokenizer that makes :class:`xattn.TokenMap` lay prompts out in 77-slot chunks.

    ``max_chunks`` cuts the prompt after that many chunks (words beyond are reported as cut).
    """

    def __init__(self, tokenizer, syntax: str = "a1111", max_chunks: int | None = None):
        self.tokenizer = tokenizer
        self.prompt_syntax = syntax
        self.max_chunks = max_chunks

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@dataclass
class PromptEmbeds:
    """What :func:`encode_prompt` made; :meth:`pipeline_kwargs` are the pipeline's arguments."""

    prompt: str  # as written
    prompt_embeds: torch.Tensor  # [1, 77k, d]
    negative_prompt_embeds: torch.Tensor  # [1, 77k, d]
    tokenizer: LongPromptTokenizer
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL: [1, d2], from the first chunk
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    token_map: TokenMap | None = field(default=None, repr=False)

    def pipeline_kwargs(self) -> dict:
        kwargs = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": self.negative_prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_prompt_embeds
            kwargs["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kwargs


@torch.no_grad()
def encode_prompt(pipe, prompt: str, negative_prompt: str = "", syntax: str = "a1111", emphasis: bool = True,
                  max_chunks: int | None = None) -> PromptEmbeds:
    """Embeddings of a written prompt of any length, chunk by chunk as A1111 encodes it.

    Args:
        pipe: a Stable Diffusion 1.x/2.x pipeline (``tokenizer``, ``text_encoder``) or SDXL
            (also ``tokenizer_2``, ``text_encoder_2``).
        prompt, negative_prompt: prompts as written, in ``syntax`` (``"a1111"`` or ``"compel"``).
        emphasis: apply the prompt's weights to the embeddings, A1111's way (scale each token's
            embedding, then restore each chunk's mean). With ``False`` the weights are left to a
            :class:`xattn.Reweight` at the attention level. With ``syntax="compel"`` it is compel's
            own formula instead (:mod:`xattn.prompts.compel_encode`; SD 1.x/2.x and SDXL; ``.blend()``,
            ``.and()``, ``.swap()``), and long compel prompts are split as compel splits them. On SDXL
            the pooled vectors are then compel's: the second encoder's reading of the text as written.
        max_chunks: keep at most this many chunks (``1`` is the 77-token truncation of a plain pipeline;
            for compel prompts ``1`` is compel's default ``truncate_long_prompts=True``, ``None`` its ``False``).

    The shorter of prompt and negative prompt is padded with chunks of the empty prompt, as A1111 does.
    """
    from . import parse_prompt

    tokenizer = LongPromptTokenizer(pipe.tokenizer, syntax, max_chunks)
    encoders = _encoders(pipe)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    texts = (parse_prompt(prompt, syntax=syntax), parse_prompt(negative_prompt, syntax=syntax), parse_prompt(""))
    if syntax == "compel":
        _check_compel(texts[:2], emphasis, max_chunks)
    if syntax == "compel" and emphasis:
        from .compel_encode import compel_embeds, compel_pooled

        encoded = [[(compel_embeds(tok, encoder, text, truncate=max_chunks == 1, penultimate=sdxl), None)
                    for tok, encoder in encoders] for text in texts]
        if sdxl:  # compel pools the second encoder's reading of the text as written
            for parts, written in zip(encoded, (prompt, negative_prompt)):
                parts[-1] = (parts[-1][0], compel_pooled(pipe.tokenizer_2, pipe.text_encoder_2, written))
    else:
        encoded = [[_encode(encoder, tok, text, emphasis, max_chunks, sdxl) for tok, encoder in encoders]
                   for text in texts]
    cond, uncond, blank = (torch.cat([hidden for hidden, _ in parts], dim=-1) for parts in encoded)
    cond, uncond = _pad_to_same_length(cond, uncond, blank)
    result = PromptEmbeds(prompt, cond, uncond, tokenizer, token_map=TokenMap(tokenizer, prompt))
    if sdxl:
        result.pooled_prompt_embeds, result.negative_pooled_prompt_embeds = encoded[0][-1][1], encoded[1][-1][1]
    return result


def _encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs whose outputs are concatenated along the features."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None),
                                                   getattr(pipe, "text_encoder_2", None))]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def token_chunks(tokenizer, prompt: WeightedPrompt,
                 max_chunks: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids and weights of each 77-slot chunk of a parsed prompt, fragment by fragment."""
    stream: list[int | None] = []
    weights: list[float] = []
    for fragment in prompt.fragments:
        if fragment.is_break:
            stream.append(None)
            continue
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(fragment.text))  # no length warning
        stream += ids
        weights += [fragment.weight] * len(ids)
    if prompt.syntax == "compel":  # compel's own splitting; max_chunks=1 is its cut after 75 tokens
        layout = place_compel_tokens([None if token is None else tokenizer.convert_ids_to_tokens(token)
                                      for token in stream], truncate=max_chunks == 1)
        max_chunks = None
        kept = [slot < layout.num_chunks * CHUNK_SLOTS for slot in layout.slots]
        stream = [token for token, keep in zip((t for t in stream if t is not None), kept) if keep]
        weights = [weight for weight, keep in zip(weights, kept) if keep]
        layout = type(layout)(tuple(slot for slot, keep in zip(layout.slots, kept) if keep), layout.chunk_lengths)
    else:
        comma_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(","))
        layout = place_tokens(stream, comma_ids[0] if len(comma_ids) == 1 else None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = chunk_ids([token for token in stream if token is not None], layout, tokenizer.bos_token_id,
                     tokenizer.eos_token_id, pad)
    multipliers = [[1.0] * CHUNK_SLOTS for _ in rows]
    for weight, slot in zip(weights, layout.slots):
        multipliers[slot // CHUNK_SLOTS][slot % CHUNK_SLOTS] = weight
    keep = max_chunks or len(rows)
    return rows[:keep], multipliers[:keep]


def _check_compel(prompts, emphasis: bool, max_chunks: int | None) -> None:
    """What the compel formula (and compel's layout without it) cannot do, refused by name."""
    if max_chunks not in (None, 1):
        raise UnsupportedSyntaxError("compel keeps every chunk or (max_chunks=1) cuts each prompt after 75 tokens; "
                                     f"max_chunks={max_chunks} has no compel meaning", prompts[0].text, 0)
    for prompt in prompts:
        operator = prompt.operator
        if emphasis or operator is None:
            continue
        if operator.kind == "blend" or any(weight != 1 for weight in operator.weights):
            raise UnsupportedSyntaxError(f"compel's .{operator.kind}() weights whole prompts' embeddings, which has "
                                         "no attention-level form; encode it with emphasis=True", prompt.text, 0)


def _encode(text_encoder, tokenizer, prompt: WeightedPrompt, emphasis: bool, max_chunks: int | None, sdxl: bool):
    """``([1, 77k, d] hidden states, pooled output of the first chunk or None)`` for one encoder.

    SDXL reads the penultimate layer of each encoder and the projected pooled
    output of the second; SD 1.x/2.x the last layer after its final norm.
    """
    from ..reweight.modes import emphasise

    rows, multipliers = token_chunks(tokenizer, prompt, max_chunks)
    hidden, pooled = [], None
    for index, (ids, weights) in enumerate(zip(rows, multipliers)):
        output = text_encoder(torch.tensor([ids], device=text_encoder.device), output_hidden_states=True)
        states = output.hidden_states[-2] if sdxl else output[0]
        if index == 0 and hasattr(output, "text_embeds"):
            pooled = output.text_embeds
        if emphasis and any(weight != 1.0 for weight in weights):
            states = emphasise(states, torch.tensor([weights], dtype=states.dtype, device=states.device))
        hidden.append(states)
    return torch.cat(hidden, dim=1), pooled


def _pad_to_same_length(cond: torch.Tensor, uncond: torch.Tensor, blank: torch.Tensor):
    """Pad the shorter with empty-prompt chunks so guidance can stack them (A1111's pad_cond_uncond)."""
    missing = (cond.shape[1] - uncond.shape[1]) // CHUNK_SLOTS
    if missing > 0:
        uncond = torch.cat([uncond, blank.repeat(1, missing, 1)], dim=1)
    elif missing < 0:
        cond = torch.cat([cond, blank.repeat(1, -missing, 1)], dim=1)
    return cond, uncond

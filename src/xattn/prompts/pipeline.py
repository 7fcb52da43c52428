"""Prompts as written, handed to a pipeline: plain strings where it reads them as meant, else embeddings.

A pipeline sends ``a (red:1.5) circle`` to CLIP character by character and
cuts a prompt after 75 tokens. :func:`prompt_kwargs` passes a prompt through
unchanged when the pipeline would read it as its dialect means it (no syntax,
at most 75 tokens), so plain prompts make the same images as before, and
otherwise encodes every prompt of the call with :func:`encode_prompt`.

A prompt with A1111's prompt editing or alternation (``a [red:blue:0.5] circle``)
needs a :class:`~xattn.prompts.PromptSchedule` running during the call:
:func:`prompt_kwargs` then returns it under :data:`SCHEDULE_KEY` next to the
embeddings, and :func:`call` (or ``xattn.app.runner.generate``) runs it. A prompt
with ``AND`` or a trailing ``:weight`` (composable diffusion) needs a
:class:`~xattn.prompts.ComposedPrompt` the same way, under the same key.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .chunks import CHUNK_SLOTS, CHUNK_TOKENS
from .compose import is_composed
from .editing import has_schedule
from .encode import LongPromptTokenizer, encode_prompt, token_chunks

SCHEDULE_KEY = "xattn_prompt_schedule"  # in prompt_kwargs(): a PromptSchedule to run during the call


def reads_plainly(tokenizer, text: str, syntax: str = "a1111") -> bool:
    """True when a plain pipeline reads ``text`` as the dialect means it: no syntax, at most 75 tokens."""
    from . import parse_prompt

    if syntax == "a1111" and (has_schedule(text) or is_composed(text)):
        return False
    parsed = parse_prompt(text, syntax=syntax)
    plain = parsed.text == text and not parsed.breaks and all(f.weight == 1.0 for f in parsed.fragments)
    return plain and len(tokenizer.tokenize(text)) <= CHUNK_TOKENS


def prompt_kwargs(pipe, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                  syntax: str = "a1111", literal: bool = False) -> dict:
    """``prompt=``/``negative_prompt=`` when every prompt reads plainly, else embeddings for what does not.

    When only negative prompts need the encoder and fit one chunk, the
    positive prompts stay strings (so a session still names the rows by
    them); otherwise every prompt is encoded, padded with empty-prompt chunks
    to the longest. ``literal`` prompts are already clean text (``Reweight.prompt``):
    they stay strings, and a negative prompt is cut to one window to match them.
    """
    positives = list(prompts)
    negatives = list(negative_prompts) if negative_prompts is not None else None
    if _composed(positives, syntax) and not literal:
        from .compose import ComposedPrompt

        composed = ComposedPrompt(pipe, *_one_composed(positives, negatives))
        return {**composed.pipeline_kwargs(), SCHEDULE_KEY: composed}
    if _scheduled(positives + (negatives or []), syntax) and not literal:
        from .schedule import PromptSchedule

        schedule = PromptSchedule(pipe, positives, negatives)
        return {**schedule.pipeline_kwargs(), SCHEDULE_KEY: schedule}
    keep_positive, keep_negative = _plain(pipe, positives, negatives, syntax)
    if literal and not keep_positive:
        keep_positive, keep_negative = True, False
    kwargs: dict = {"prompt": positives} if keep_positive else {}
    if keep_positive and keep_negative:
        return {**kwargs, **({"negative_prompt": negatives} if negatives is not None else {})}
    encoded = [encode_prompt(pipe, text, negative, syntax=syntax, max_chunks=1 if literal else None)
               for text, negative in zip(positives, negatives or [""] * len(positives))]
    blank = encode_prompt(pipe, "", syntax=syntax, emphasis=False).prompt_embeds
    if not keep_positive:
        kwargs["prompt_embeds"] = _stack([e.prompt_embeds for e in encoded], blank)
    kwargs["negative_prompt_embeds"] = _stack([e.negative_prompt_embeds for e in encoded], blank)
    if encoded[0].pooled_prompt_embeds is not None:
        if not keep_positive:
            kwargs["pooled_prompt_embeds"] = torch.cat([e.pooled_prompt_embeds for e in encoded])
        kwargs["negative_pooled_prompt_embeds"] = torch.cat([e.negative_pooled_prompt_embeds for e in encoded])
        _zero_empty_negatives(pipe, kwargs, negatives or [""] * len(positives))
    return kwargs


def _zero_empty_negatives(pipe, kwargs: dict, negatives: list) -> None:
    """SDXL: an empty negative prompt is zeros (its chunk of hidden states and its pooled vector) where the
    pipeline's config says ``force_zeros_for_empty_prompt``, as ``pipe(prompt)`` makes it and A1111 does on SDXL;
    chunks that pad it to the prompt's length stay the empty prompt's encoding (A1111's padding)."""
    if not getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return
    empty = [index for index, text in enumerate(negatives) if not text]
    if not empty:
        return
    hidden, pooled = kwargs["negative_prompt_embeds"].clone(), kwargs["negative_pooled_prompt_embeds"].clone()
    hidden[empty, :CHUNK_SLOTS] = 0
    pooled[empty] = 0
    kwargs["negative_prompt_embeds"], kwargs["negative_pooled_prompt_embeds"] = hidden, pooled


def hook_names(pipe, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
               syntax: str = "a1111") -> dict:
    """``xattn.hooks`` arguments that name the rows of a :func:`prompt_kwargs` call made of embeddings."""
    negatives = list(negative_prompts) if negative_prompts is not None else None
    if _composed(list(prompts), syntax):
        from .schedule import ScheduleTokenizer
        from .compose import split_composition

        texts = [part.text for part in split_composition(_one_composed(list(prompts), negatives)[0])]
        return {"prompts": texts, "tokenizer": ScheduleTokenizer(pipe.tokenizer)}
    if _scheduled(list(prompts) + (negatives or []), syntax):
        from .schedule import ScheduleTokenizer

        return {"prompts": list(prompts), "tokenizer": ScheduleTokenizer(pipe.tokenizer)}
    if _plain(pipe, list(prompts), negatives, syntax)[0]:
        return {}
    return {"prompts": list(prompts), "tokenizer": LongPromptTokenizer(pipe.tokenizer, syntax)}


def call(pipe, **kwargs):
    """``pipe(**kwargs)``, running the :class:`~xattn.prompts.PromptSchedule` (or
    :class:`~xattn.prompts.ComposedPrompt`) that :func:`prompt_kwargs` put under :data:`SCHEDULE_KEY`
    (in a session of its own, nested in any open one)."""
    schedule = kwargs.pop(SCHEDULE_KEY, None)
    if schedule is None:
        return pipe(**kwargs)
    if hasattr(schedule, "hooks"):  # a ComposedPrompt: its session also wraps the denoiser
        with schedule.hooks():
            return pipe(**kwargs)
    from ..session import hooks

    with hooks(pipe, schedule, **schedule.hook_kwargs()):
        return pipe(**kwargs)


def _composed(prompts: list[str], syntax: str) -> bool:
    return syntax == "a1111" and any(is_composed(text) for text in prompts)


def _one_composed(prompts: list[str], negatives: list[str] | None) -> tuple[str, str]:
    """The one prompt (and negative prompt) of a call with AND; several prompts are refused by name."""
    from .types import UnsupportedSyntaxError

    if len(prompts) != 1 or (negatives is not None and len(negatives) != 1):
        text = next(t for t in prompts if is_composed(t))
        raise UnsupportedSyntaxError(f"AND (composable diffusion) runs one prompt per call, not {len(prompts)}: "
                                     "generate the prompts one by one", text, 0)
    return prompts[0], (negatives[0] if negatives else "") or ""


def _scheduled(prompts: list[str], syntax: str) -> bool:
    return syntax == "a1111" and any(has_schedule(text) for text in prompts)


def _plain(pipe, prompts: list[str], negatives: list[str] | None, syntax: str) -> tuple[bool, bool]:
    """(positive prompts stay strings, negative prompts stay strings)."""
    from . import parse_prompt

    plain_negative = all(reads_plainly(pipe.tokenizer, text, syntax) for text in negatives or [])
    plain_positive = all(reads_plainly(pipe.tokenizer, text, syntax) for text in prompts)
    if plain_positive and not plain_negative:
        one_chunk = [len(token_chunks(pipe.tokenizer, parse_prompt(text, syntax=syntax))[0]) == 1
                     for text in negatives or []]
        plain_positive = all(one_chunk)
    return plain_positive, plain_negative and plain_positive


def _stack(rows: list[torch.Tensor], blank: torch.Tensor) -> torch.Tensor:
    """``[n, 77k, d]`` from ``n`` rows of ``[1, 77k_i, d]``, padding each with empty-prompt chunks."""
    longest = max(row.shape[1] for row in rows)
    padded = [torch.cat([row, blank.repeat(1, (longest - row.shape[1]) // blank.shape[1], 1)], dim=1)
              for row in rows]
    return torch.cat(padded)

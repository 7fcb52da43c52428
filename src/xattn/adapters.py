"""Pipeline adapters: what a pipeline encoded, and which row of a denoiser call is which.

Pipelines differ in what ``encode_prompt`` returns (SD: embeddings and
negative embeddings; SDXL adds pooled embeddings; PixArt and Sana interleave
attention masks). A small adapter per family reads that return value into an
:class:`Encoded`; :func:`match_rows` then identifies each row of a denoiser
call by equality with those embeddings, which tells conditional from
unconditional rows and the prompt and image of each, without assuming which
half of the batch is which. Rows that match nothing are an error naming the
pipeline, never a silent "every row is conditional".
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import LayoutError
from .hookpoints import BatchLayout, Row
from .token_parts import PartsTokenMap
from .tokens import TokenMap


@dataclass
class Encoded:
    """What the pipeline's ``encode_prompt`` returned for the current call."""

    prompts: list[str] | None
    negative_prompts: list[str | None]
    images_per_prompt: int
    cond: torch.Tensor | None  # [n_prompts * n_images, j, d]
    uncond: torch.Tensor | None  # same shape, or None without classifier-free guidance
    other_prompts: dict | None = None  # prompt_2 / prompt_3 as given (SD3, Flux: the text of other encoders)
    options: dict | None = None  # encode_prompt options a token map needs (Sana: its instruction, clean_caption)


Unpack = Callable[[tuple], tuple[torch.Tensor | None, torch.Tensor | None]]
MakeTokenMap = Callable[[object, str, int, Encoded], object]  # (pipe, prompt, text length, encoded) -> token map


@dataclass(frozen=True)
class Adapter:
    """How one pipeline family encodes prompts."""

    family: str
    class_prefixes: tuple[str, ...]  # pipeline class names (or their bases') that belong to the family
    unpack: Unpack  # encode_prompt's return value -> (cond, uncond) embeddings
    tokenizer_attributes: tuple[str, ...] = ("tokenizer",)
    token_map: MakeTokenMap | None = None  # how a prompt's words sit in the text; default TokenMap(tokenizer)

    def tokenizer(self, pipe):
        for attribute in self.tokenizer_attributes:
            tokenizer = getattr(pipe, attribute, None)
            if tokenizer is not None:
                return tokenizer
        return None

    def encoded(self, arguments: dict, result) -> Encoded:
        prompts = arguments.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        negatives = arguments.get("negative_prompt")
        count = len(prompts) if prompts is not None else 0
        if negatives is None or isinstance(negatives, str):
            negatives = [negatives] * count
        cond, uncond = self.unpack(tuple(result) if isinstance(result, (tuple, list)) else (result,))
        return Encoded(
            prompts=list(prompts) if prompts is not None else None,
            negative_prompts=list(negatives),
            images_per_prompt=int(arguments.get("num_images_per_prompt") or 1),
            cond=cond,
            uncond=uncond,
            other_prompts={k: arguments[k] for k in ("prompt_2", "prompt_3") if arguments.get(k) is not None},
            options={k: arguments[k] for k in _TOKEN_OPTIONS if k in arguments},
        )


_TOKEN_OPTIONS = ("complex_human_instruction", "clean_caption")  # Sana: what its encode_prompt puts before a prompt


def _first_two(result: tuple):
    return result[0], (result[1] if len(result) > 1 else None)


def _masked_pairs(result: tuple):  # (embeds, mask, negative_embeds, negative_mask)
    return result[0], (result[2] if len(result) > 2 else None)


def _embeds_only(result: tuple):  # Flux: (embeds, pooled, text_ids); guidance-distilled, no unconditional rows
    return result[0], None


def _flux_token_map(pipe, prompt: str, length: int, encoded: Encoded):
    """Flux's text is T5's sequence alone (CLIP gives only the pooled vector); None when T5 got ``prompt_2``."""
    if (encoded.other_prompts or {}).get("prompt_2") is not None:
        return None
    return TokenMap(pipe.tokenizer_2, prompt, max_length=length)


def _sd3_token_map(pipe, prompt: str, length: int, encoded: Encoded):
    """CLIP's 77 slots (CLIP-L and CLIP-G side by side share them), then T5's: a word has slots in each."""
    clip = TokenMap(pipe.tokenizer, prompt)
    t5 = getattr(pipe, "tokenizer_3", None)
    if (t5 is None or getattr(pipe, "text_encoder_3", None) is None  # the T5 part is zeros: no word there
            or length <= clip.max_length or (encoded.other_prompts or {}).get("prompt_3") is not None):
        return clip
    return PartsTokenMap([(0, clip), (clip.max_length, TokenMap(t5, prompt, max_length=length - clip.max_length))])


def _sana_token_map(pipe, prompt: str, length: int, encoded: Encoded):
    """Sana's Gemma text: ``<bos>`` then the prompt's pieces, after an instruction the pipeline cuts off again."""
    from .sana import sana_token_map

    return sana_token_map(pipe, prompt, length, encoded.options or {})


# Most specific first: a class is matched by the first adapter one of its bases' names starts with.
ADAPTERS: tuple[Adapter, ...] = (
    # SD3: (embeds, negative, pooled, negative pooled); the text is CLIP-L+G's 77 slots, then T5's
    Adapter("sd3", ("StableDiffusion3",), _first_two, ("tokenizer", "tokenizer_2"), _sd3_token_map),
    Adapter("sdxl", ("StableDiffusionXL",), _first_two, ("tokenizer", "tokenizer_2")),
    Adapter("sd", ("StableDiffusion", "AltDiffusion"), _first_two),
    Adapter("pixart", ("PixArt",), _masked_pairs),
    # Sana: (embeds, mask, negative embeds, negative mask); Gemma text behind an instruction (xattn.sana)
    Adapter("sana", ("Sana",), _masked_pairs, ("tokenizer",), _sana_token_map),
    # Flux: text-to-image only (its img2img, fill, control and Kontext pipelines add image tokens or inputs)
    Adapter("flux", ("FluxPipeline",), _embeds_only, ("tokenizer_2",), _flux_token_map),
)
UNSUPPORTED_PREFIXES = ("Flux",)  # the other Flux pipelines: not adapted yet


class TrueCFGError(LayoutError):
    """What Flux's true CFG (a negative prompt, ``true_cfg_scale > 1``) does not support: it calls the
    transformer twice a step, once on the prompts' rows and once on the negative prompts' rows, and
    edits and guidance need a row and its partner in one call. (``Capture(uncond=True)`` works: it
    keeps the second call's rows with the first's.)"""


def combine(previous: Encoded | None, new: Encoded, adapter: Adapter | None, controllers=(),
            pipeline_name: str = "the pipeline") -> Encoded:
    """What one pipeline call has encoded, after another ``encode_prompt`` call returned ``new``.

    Flux's true CFG encodes the negative prompt in a second call and runs the
    transformer once on each text a step: the second encoding becomes the
    unconditional embeddings, so each call's rows are told apart by equality as
    usual (the first call's rows are all conditional, the second's all
    unconditional). Controllers that need a row and its partner in one call
    (edits, guidance) are refused by name; ``Capture(uncond=True)`` keeps the
    second call's rows with the first's, as if both were one batched call.
    Any other second call replaces the first.
    """
    if previous is None or adapter is None or adapter.family != "flux" or previous.uncond is not None:
        return new
    refused = [c for c in controllers if type(c).__module__.startswith(("xattn.edit", "xattn.guide"))
               or c.wants_before_step()]
    if refused:
        raise TrueCFGError(f"{pipeline_name} with true CFG (a negative prompt and true_cfg_scale > 1) runs the "
                           "transformer twice a step, on the prompts' and on the negative prompts' rows; xattn "
                           f"does not run {', '.join(type(c).__name__ for c in refused)} across those two calls "
                           "(edits and guidance need a row and its partner in one call): drop negative_prompt or "
                           "set true_cfg_scale=1")
    negatives = new.prompts if new.prompts is not None else [None] * len(previous.prompts or ())
    return Encoded(previous.prompts, list(negatives), previous.images_per_prompt, previous.cond, new.cond,
                   previous.other_prompts, previous.options)


def at_asked_size(pipe, kwargs: dict) -> dict:
    """``kwargs`` (changed in place) with resolution binning off where the pipeline has it (PixArt, Sana): the
    image comes at the size asked for, not the nearest trained aspect-ratio bin, which also refuses a
    transformer of a sample size it has no bins for."""
    if "use_resolution_binning" in inspect.signature(type(pipe).__call__).parameters:
        kwargs.setdefault("use_resolution_binning", False)
    return kwargs


def adapter_for(pipe) -> Adapter | None:
    """The adapter of ``pipe``'s family, or None for a pipeline xattn has no adapter for."""
    for cls in type(pipe).__mro__:
        name = cls.__name__
        for adapter in ADAPTERS:
            if name.startswith(adapter.class_prefixes):
                return adapter
        if name.startswith(UNSUPPORTED_PREFIXES):
            return None
    return None


def match_rows(text: torch.Tensor, encoded: Encoded, tokenizer, pipeline_name: str,
               make_map: Callable[[str], object] | None = None) -> BatchLayout:
    """Identify each row of ``text`` [b, j, d] by equality with the encoded embeddings.

    ``make_map``: a prompt's token map (default ``TokenMap(tokenizer, prompt)``).
    """
    n_images = encoded.images_per_prompt
    candidates = [(True, encoded.cond), (False, encoded.uncond)]
    used: set[tuple[bool, int]] = set()
    rows: list[Row] = []
    for r in range(text.shape[0]):
        row = None
        for cond, embeds in candidates:
            if embeds is None or embeds.shape[1:] != text.shape[1:]:
                continue
            for k in range(embeds.shape[0]):
                if (cond, k) not in used and torch.equal(embeds[k].to(text), text[r]):
                    used.add((cond, k))
                    row = Row(cond, k // n_images, k % n_images)
                    break
            if row is not None:
                break
        if row is None:
            raise LayoutError(
                f"row {r} of the {pipeline_name} call matches none of the embeddings its encode_prompt "
                "returned (were they changed between encoding and the denoiser?); pass `layout=` to xattn.hooks(...) "
                "to say which row is which"
            )
        rows.append(row)
    prompts = tuple(encoded.prompts) if encoded.prompts is not None else ()
    if make_map is None and tokenizer is not None:
        make_map = lambda prompt: TokenMap(tokenizer, prompt)  # noqa: E731
    token_maps = tuple(make_map(p) if (make_map is not None and p is not None) else None for p in prompts)
    return BatchLayout(rows=tuple(rows), prompts=prompts, token_maps=token_maps,
                       negative_prompts=tuple(encoded.negative_prompts))


def layout_without_encoding(batch_size: int, override: BatchLayout | None, prompts: list[str] | None,
                            tokenizer) -> BatchLayout:
    """The layout of a call the pipeline did not encode: given whole, named by ``prompts=``, or plain."""
    if override is not None:
        if override.batch_size != batch_size:
            raise LayoutError(f"the given layout has {override.batch_size} rows, the call has {batch_size}")
        return override
    if prompts is None or tokenizer is None:
        return BatchLayout.plain(batch_size)
    if len(prompts) != batch_size:
        raise LayoutError(f"prompts= names {len(prompts)} rows, the call has {batch_size}; "
                          "pass one prompt per row, or a full `layout=`")
    return BatchLayout(rows=tuple(Row(True, i, 0) for i in range(batch_size)), prompts=tuple(prompts),
                       token_maps=tuple(TokenMap(tokenizer, p) for p in prompts))


def layout_of_pipeline_call(text: torch.Tensor, encoded: Encoded, adapter: Adapter | None, pipe,
                            prompts: list[str] | None, tokenizer) -> BatchLayout:
    """The layout of a denoiser call inside a pipeline call; ``prompts`` rename the encoded prompts."""
    name = type(pipe).__name__
    if adapter is None:
        raise LayoutError(f"xattn has no pipeline adapter for {name}, so it cannot tell which rows are which; "
                          "pass `layout=` to xattn.hooks(...)")
    if prompts is not None:
        if encoded.prompts is not None and len(encoded.prompts) != len(prompts):
            raise LayoutError(f"prompts= names {len(prompts)} prompts, the {name} call has {len(encoded.prompts)}")
        encoded = Encoded(list(prompts), encoded.negative_prompts or [None] * len(prompts),
                          encoded.images_per_prompt, encoded.cond, encoded.uncond, options=encoded.options)
    make_map = None
    if adapter.token_map is not None and (tokenizer is None or tokenizer is getattr(pipe, "tokenizer", None)):
        make_map = lambda prompt: adapter.token_map(pipe, prompt, text.shape[1], encoded)  # noqa: E731
    return match_rows(text, encoded, tokenizer or adapter.tokenizer(pipe), name, make_map)


__all__ = ["ADAPTERS", "Adapter", "Encoded", "TrueCFGError", "adapter_for", "at_asked_size", "combine", "layout_of_pipeline_call",
           "layout_without_encoding", "match_rows"]

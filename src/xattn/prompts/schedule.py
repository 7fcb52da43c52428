"""Run A1111's prompt editing and alternation: each step's text fed to the cross-attention.

A prompt such as ``a [red:blue:0.5] circle`` is a step schedule of plain
prompts (:mod:`xattn.prompts.editing`). :class:`PromptSchedule` encodes every
text of the schedule once, as :func:`xattn.prompts.encode_prompt` encodes a
prompt (A1111's chunks and emphasis), and at the ``context`` hook point (the
text entering every cross-attention's ``to_k`` / ``to_v``) replaces the
conditional rows with the text of the current step. The unconditional rows
(the negative prompt) are left as the pipeline made them. In SD 1.x/2.x the
text reaches the UNet only through cross-attention, so this equals switching
the pipeline's ``prompt_embeds`` between steps, which is what A1111 does.

Usage::

    schedule = PromptSchedule(pipe, "a [red:blue:0.5] circle")
    with xattn.hooks(pipe, schedule, **schedule.hook_kwargs()):
        image = pipe(**schedule.pipeline_kwargs(), num_inference_steps=20).images[0]

Word lookups (``Capture().maps().word("circle")``, ``Reweight``) on a scheduled
prompt find a word only where it sits at the same token slots in every text the
prompt can give (:class:`ScheduleTokenMap`); any other word is a ``TokenError``
that lists the texts.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..errors import XattnError
from ..hookpoints import Controller, HookContext, Run
from ..selector import Selector
from ..tokens import TokenError, TokenMap
from .a1111 import refuse_composition, strip_extra_networks
from .chunks import CHUNK_SLOTS
from .editing import has_schedule, parse_schedule, sub_prompts, text_at
from .encode import LongPromptTokenizer, encode_prompt, token_chunks
from .types import ScheduledPromptError, UnsupportedSyntaxError

TEXT_SYNTAX = "a1111-text"  # one text of a schedule: A1111's attention rules only (see xattn.prompts.parse_prompt)


class ScheduleError(XattnError, ValueError):
    """A prompt schedule that cannot run in this call (no step count, other prompts than it was made for)."""


class PromptSchedule(Controller):
    """Feed each step the conditioning of its text, for prompts with A1111's prompt editing or alternation.

    Args:
        pipe: a Stable Diffusion 1.x/2.x pipeline (SDXL is refused: see below).
        prompts: one prompt or a list (one per prompt of the call), in A1111's dialect. Prompts
            without editing are allowed in the list and stay constant.
        negative_prompts: the negative prompt(s); they may not hold editing or alternation.
        emphasis: apply A1111's weights to the embeddings (as :func:`encode_prompt`).

    :meth:`pipeline_kwargs` gives ``prompt_embeds`` (each prompt's first text) and
    ``negative_prompt_embeds``; :meth:`hook_kwargs` names the rows for ``xattn.hooks``.
    At each step the conditional rows of prompt ``p`` get the encoding of the text
    A1111 uses at that step (:func:`xattn.prompts.editing.text_at`, step counted
    from 0 by the pipeline's scheduler; A1111 counts denoiser calls, the same for
    first-order samplers).

    SDXL is refused (:class:`UnsupportedSyntaxError`): A1111 switches its pooled text
    embedding with the text, and the pooled vector reaches the UNet outside cross-attention.
    """

    selector = Selector(kind="cross")

    def __init__(self, pipe, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None,
                 emphasis: bool = True):
        written = [prompts] if isinstance(prompts, str) else list(prompts)
        if not written:
            raise ScheduleError("PromptSchedule needs at least one prompt")
        _check_pipeline(pipe, written[0])
        if negative_prompts is None:
            negatives = [""] * len(written)
        else:
            negatives = [negative_prompts] * len(written) if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negatives) != len(written):
            raise ScheduleError(f"{len(written)} prompts but {len(negatives)} negative prompts")
        self.pipe, self.written, self.emphasis = pipe, written, emphasis
        self.prompts = [_read(text) for text in written]
        self.negatives = [_read(text) for text in negatives]
        for text, negative in zip(negatives, self.negatives):
            if has_schedule(negative):
                raise ScheduledPromptError("prompt editing / alternation in the negative prompt is not supported yet",
                                           text, max(text.find("["), 0))
        self._cache: dict[tuple[int, str], torch.Tensor] = {}  # (prompt, text) -> [77k, d] conditional rows
        self._chunks: dict[int, int] = {}  # prompt -> chunk count every text of it must have
        self._uncond = [encode_prompt(pipe, "", negative, syntax=TEXT_SYNTAX, emphasis=emphasis).negative_prompt_embeds
                        for negative in self.negatives]
        first = [self._initial(index) for index in range(len(self.prompts))]
        self._length = max(row.shape[0] for row in first + [u[0] for u in self._uncond])
        self._blank = encode_prompt(pipe, "", syntax=TEXT_SYNTAX, emphasis=False).prompt_embeds[0]  # [77, d]
        self._embeds = torch.stack([self._padded(row) for row in first])
        self._negative = torch.stack([self._padded(u[0]) for u in self._uncond])
        self._by_step: list[torch.Tensor] | None = None  # per prompt: [steps, 77k, d]
        self.schedules: list[list] = []  # per prompt: the last run's schedule, [(until, text), ...]

    # -- what the call needs ---------------------------------------------------------------
    def pipeline_kwargs(self) -> dict:
        """``prompt_embeds`` and ``negative_prompt_embeds`` for ``pipe(...)``."""
        return {"prompt_embeds": self._embeds, "negative_prompt_embeds": self._negative}

    def hook_kwargs(self) -> dict:
        """``prompts=`` / ``tokenizer=`` for ``xattn.hooks``: rows named by the written prompts, words looked up
        in every text of a schedule."""
        return {"prompts": list(self.written), "tokenizer": ScheduleTokenizer(self.pipe.tokenizer)}

    # -- the run ---------------------------------------------------------------------------
    def begin_run(self, run: Run) -> None:
        if run.num_steps is None:
            raise ScheduleError("a prompt schedule needs the run's step count: call the pipeline, not the bare UNet")
        if run.layout.num_prompts != len(self.prompts):
            raise ScheduleError(f"the schedule was made for {len(self.prompts)} prompt(s); this call has "
                                f"{run.layout.num_prompts}")
        self.schedules = [parse_schedule(prompt, run.num_steps) for prompt in self.prompts]
        self._by_step = [torch.stack([self._padded(self._encoded(index, text_at(schedule, step)))
                                      for step in range(run.num_steps)])
                         for index, schedule in enumerate(self.schedules)]

    def context(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        if self._by_step is None or ctx.step is None:
            return None
        if x.shape[1] != self._length:
            raise ScheduleError(f"the call's text has {x.shape[1]} slots, the schedule's {self._length}: pass "
                                "schedule.pipeline_kwargs() to the pipeline")
        x = x.clone()
        for index, steps in enumerate(self._by_step):
            rows = ctx.layout.row_indices(cond=True, prompt=index)
            if rows:
                x[rows] = steps[min(ctx.step, steps.shape[0] - 1)].to(x.device, x.dtype)
        return x

    def texts(self, num_steps: int, prompt: int = 0) -> list[str]:
        """The text of each step ``0 .. num_steps-1`` of prompt ``prompt``."""
        schedule = parse_schedule(self.prompts[prompt], num_steps)
        return [text_at(schedule, step) for step in range(num_steps)]

    def to_dict(self) -> dict:
        return {"prompt_schedule": list(self.written)}

    def __repr__(self) -> str:
        return f"PromptSchedule({self.written!r})"

    # -- encoding --------------------------------------------------------------------------
    def _encoded(self, index: int, text: str) -> torch.Tensor:
        key = (index, text)
        if key not in self._cache:
            chunks = len(token_chunks(self.pipe.tokenizer, _text_prompt(text))[0])
            expected = self._chunks.setdefault(index, chunks)
            if chunks != expected:
                raise UnsupportedSyntaxError(
                    f"the texts of this schedule fill different numbers of 75-token chunks ({expected} and {chunks}, "
                    f"{text!r}); A1111 pads them in a way xattn does not reproduce: keep every text within the "
                    "same number of chunks", self.written[index], 0)
            embeds = encode_prompt(self.pipe, text, self.negatives[index], syntax=TEXT_SYNTAX, emphasis=self.emphasis)
            self._cache[key] = embeds.prompt_embeds[0]
        return self._cache[key]

    def _initial(self, index: int) -> torch.Tensor:
        """The rows the pipeline is called with: the first text that differs from the negative prompt's rows
        (the session tells conditional from unconditional rows by their values)."""
        texts = sub_prompts(self.prompts[index])
        uncond = self._uncond[index][0]
        for text in texts:
            row = self._encoded(index, text)
            if row.shape != uncond.shape or not torch.equal(row, uncond):
                return row
        return self._encoded(index, texts[0])

    def _padded(self, row: torch.Tensor) -> torch.Tensor:
        missing = (self._length - row.shape[0]) // CHUNK_SLOTS
        return torch.cat([row, self._blank.repeat(missing, 1)]) if missing else row


class ScheduleTokenizer(LongPromptTokenizer):
    """A pipeline tokenizer whose :class:`TokenMap` reads prompts with editing (:class:`ScheduleTokenMap`)."""

    token_map_class = None  # set below

    def __init__(self, tokenizer, max_chunks: int | None = None):
        super().__init__(tokenizer, TEXT_SYNTAX, max_chunks)


class ScheduleTokenMap(TokenMap):
    """Words of a prompt with editing: found where every text the prompt can give has them at the same slots.

    ``a [red:blue:0.5] circle`` finds ``circle`` (and ``a``) at the slots both
    texts give it; ``red`` raises :class:`xattn.TokenError`, as it is not there
    at every step. A prompt without editing is read as usual. ``words`` lists
    the words found that way; the other fields (``prompt``...) are the first text's.
    """

    def __init__(self, tokenizer, prompt: str, max_length: int | None = None):
        base = LongPromptTokenizer(tokenizer.tokenizer, TEXT_SYNTAX, tokenizer.max_chunks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clean = strip_extra_networks(prompt)
        self.sub_maps = [(text, TokenMap(base, text)) for text in sub_prompts(clean)]
        first = self.sub_maps[0][1]
        self.__dict__.update({k: v for k, v in first.__dict__.items()})
        self._whole_words = first._whole_words
        self.written = prompt
        # What word maps list: the first text's words that every text has at the same slots.
        self.words = [word for word in first.words if all(
            any((w.key, w.occurrence, w.slots) == (word.key, word.occurrence, word.slots) for w in other.words)
            for _, other in self.sub_maps)]

    def indices(self, key: str | int) -> list[int]:
        found = []
        for text, token_map in self.sub_maps:
            try:
                found.append(token_map.indices(key))
            except TokenError as error:
                if len(self.sub_maps) == 1:
                    raise
                raise TokenError(f"{key!r} is not in every text of the scheduled prompt {self.written!r}: not in "
                                 f"{text!r} ({error}). A word of a prompt with editing or alternation is looked up "
                                 f"only where every text has it ({self._texts()})") from None
        if any(slots != found[0] for slots in found):
            raise TokenError(f"{key!r} sits at different token slots in the texts of the scheduled prompt "
                             f"{self.written!r} ({self._texts()}); a word is looked up only where every text has it "
                             "at the same slots")
        return found[0]

    def span_indices(self, start: int, end: int) -> list[int]:
        raise TokenError(f"character spans of the scheduled prompt {self.written!r} are not defined "
                         "(its texts differ); look words up instead")

    def _texts(self) -> str:
        return ", ".join(repr(text) for text, _ in self.sub_maps)


ScheduleTokenizer.token_map_class = ScheduleTokenMap


def _read(text: str) -> str:
    """A written prompt as the schedule reads it: extra networks stripped (warned), AND refused."""
    stripped = strip_extra_networks(text)
    refuse_composition(stripped)
    return stripped


def _text_prompt(text: str):
    from . import parse_prompt

    return parse_prompt(text, syntax=TEXT_SYNTAX)


def _check_pipeline(pipe, prompt: str) -> None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise UnsupportedSyntaxError(
            "prompt editing / alternation on SDXL is not supported: A1111 switches the pooled text embedding with "
            "the text at each step, and the pooled vector reaches the UNet outside cross-attention (xattn would "
            "change the cross-attention text only)", prompt, max(prompt.find("["), 0))
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise UnsupportedSyntaxError(f"prompt editing / alternation runs on Stable Diffusion 1.x/2.x pipelines, not "
                                     f"{type(pipe).__name__}", prompt, max(prompt.find("["), 0))

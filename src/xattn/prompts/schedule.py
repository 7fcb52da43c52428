"""Run A1111's prompt editing and alternation: each step's text fed to the cross-attention.

A prompt such as ``a [red:blue:0.5] circle`` is a step schedule of plain
prompts (:mod:`xattn.prompts.editing`). :class:`PromptSchedule` encodes every
text of the schedule once, as :func:`xattn.prompts.encode_prompt` encodes a
prompt (A1111's chunks and emphasis), and at the ``context`` hook point (the
text entering every cross-attention's ``to_k`` / ``to_v``) replaces the
conditional rows with the text of the current step. A negative prompt with editing or alternation is a
schedule of its own, fed to the unconditional rows the same way (A1111 schedules
both). In SD 1.x/2.x the
text reaches the UNet only through cross-attention, so this equals switching
the pipeline's ``prompt_embeds`` between steps, which is what A1111 does.

SDXL also feeds the UNet a pooled text vector (``added_cond_kwargs["text_embeds"]``,
summed into the time embedding), and A1111 switches it with the text: its
conditioning per step holds both the cross-attention states and that vector. So on
SDXL the schedule also replaces, before each UNet call, the pooled vector of the
conditional rows by the pooled output (first 75-token chunk, second encoder) of the
step's text; the time ids stay as the pipeline made them.

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

import inspect
import warnings
import weakref
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
from .types import UnsupportedSyntaxError

TEXT_SYNTAX = "a1111-text"  # one text of a schedule: A1111's attention rules only (see xattn.prompts.parse_prompt)


class ScheduleError(XattnError, ValueError):
    """A prompt schedule that cannot run in this call (no step count, other prompts than it was made for)."""


class PromptSchedule(Controller):
    """Feed each step the conditioning of its text, for prompts with A1111's prompt editing or alternation.

    Args:
        pipe: a Stable Diffusion 1.x/2.x or SDXL pipeline.
        prompts: one prompt or a list (one per prompt of the call), in A1111's dialect. Prompts
            without editing are allowed in the list and stay constant.
        negative_prompts: the negative prompt(s), with or without editing or alternation. On SDXL an
            empty negative prompt is zeros (hidden states and pooled vector) when the pipeline's config
            says ``force_zeros_for_empty_prompt``, as diffusers does for ``pipe(prompt)`` and A1111 for SDXL.
        emphasis: apply A1111's weights to the embeddings (as :func:`encode_prompt`).

    :meth:`pipeline_kwargs` gives ``prompt_embeds`` (each prompt's first text) and
    ``negative_prompt_embeds`` (on SDXL also the pooled ones); :meth:`hook_kwargs` names the
    rows for ``xattn.hooks``.
    At each step the conditional rows of prompt ``p`` get the encoding of the text
    A1111 uses at that step (:func:`xattn.prompts.editing.text_at`, step counted
    from 0 by the pipeline's scheduler). A1111 counts denoiser calls: the same for
    first-order samplers; for second-order ones (Heun, KDPM2: two calls a step but the
    last) it lays the schedule over twice the step count and reads it at each call
    (A1111 1.1), and so does this schedule (:func:`second_order_calls`).

    On SDXL the pooled vector of the conditional rows follows the schedule too (a forward
    pre-hook on the UNet, installed when a session binds the schedule, gone when it closes).
    """

    selector = Selector(kind="cross")
    conditions = True  # a guidance pass at a step conditions on that step's text, as the step's own call

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
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.prompts = [_read(text) for text in written]
        self.negatives = [_read(text) for text in negatives]
        self._cache: dict[tuple[int, str], tuple] = {}  # (prompt, text) -> ([77k, d] rows, [d2] pooled or None)
        self._chunks: dict[int, int] = {}  # prompt -> chunk count every text of it must have
        self._negative_chunks: dict[int, int] = {}  # the same for each prompt's negative prompt
        self._negative_cache: dict[tuple[int, str], tuple] = {}  # (prompt, text) -> ([1, 77k, d], [1, d2] | None)
        for index, negative in enumerate(self.negatives):  # every text of a scheduled negative, checked up front
            for text in sub_prompts(negative) if has_schedule(negative) else [negative]:
                self._negative_of(index, text)
        self._uncond = [self._negative_of(index, self._first_negative(index))  # ([1, 77k, d], [1, d2] | None)
                        for index in range(len(self.negatives))]
        first = [self._initial(index) for index in range(len(self.prompts))]
        self._length = max(row.shape[0] for row, _ in first + [(u[0][0], None) for u in self._uncond])
        self._blank = encode_prompt(pipe, "", syntax=TEXT_SYNTAX, emphasis=False).prompt_embeds[0]  # [77, d]
        self._embeds = torch.stack([self._padded(row) for row, _ in first])
        self._negative = torch.stack([self._padded(u[0][0]) for u in self._uncond])
        self._pooled = torch.stack([pooled for _, pooled in first]) if self.sdxl else None  # [n, d2]
        self._negative_pooled = torch.cat([u[1] for u in self._uncond]) if self.sdxl else None
        self._by_step: list[torch.Tensor] | None = None  # per prompt: [steps, 77k, d]
        self._pooled_by_step: list[torch.Tensor] | None = None  # SDXL, per prompt: [steps, d2]
        self._negative_by_step: dict[int, tuple] = {}  # scheduled negatives: prompt -> ([steps, 77k, d], [steps, d2])
        self._handle = None  # SDXL: the UNet pre-hook that switches the pooled vector
        self._calls: int | None = None  # a second-order sampler's denoiser calls this run (see begin_run)
        self.schedules: list[list] = []  # per prompt: the last run's schedule, [(until, text), ...]

    # -- what the call needs ---------------------------------------------------------------
    def pipeline_kwargs(self) -> dict:
        """``prompt_embeds`` and ``negative_prompt_embeds`` for ``pipe(...)`` (SDXL: and the pooled ones)."""
        kwargs = {"prompt_embeds": self._embeds, "negative_prompt_embeds": self._negative}
        if self.sdxl:
            kwargs.update(pooled_prompt_embeds=self._pooled, negative_pooled_prompt_embeds=self._negative_pooled)
        return kwargs

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
        self._calls = second_order_calls(self.pipe.scheduler)  # None: one denoiser call a step
        positions = run.num_steps if self._calls is None else self._calls  # steps, or denoiser calls
        length = positions if self._calls is None else self._calls + 1  # A1111: twice the steps (2N-1 calls)
        self.schedules = [parse_schedule(prompt, length) for prompt in self.prompts]
        texts = [[text_at(schedule, position) for position in range(positions)] for schedule in self.schedules]
        self._by_step = [torch.stack([self._padded(self._encoded(index, text)[0]) for text in steps])
                         for index, steps in enumerate(texts)]
        if self.sdxl:
            self._pooled_by_step = [torch.stack([self._encoded(index, text)[1] for text in steps])
                                    for index, steps in enumerate(texts)]
        self._negative_by_step = {}
        for index, negative in enumerate(self.negatives):
            if has_schedule(negative):
                schedule = parse_schedule(negative, length)
                encoded = [self._negative_of(index, text_at(schedule, position)) for position in range(positions)]
                hidden = torch.stack([self._padded(row[0]) for row, _ in encoded])
                self._negative_by_step[index] = (hidden, torch.cat([p for _, p in encoded]) if self.sdxl else None)

    def bind(self, session) -> None:
        """On SDXL: hook the UNet so that the pooled vector follows the schedule in this session."""
        if self.sdxl:
            self._unhook()
            self._handle = pooled_hook(session, self)

    def _unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pooled(self, text_embeds: torch.Tensor, layout, step: int | None) -> torch.Tensor | None:
        """``text_embeds`` (SDXL's pooled vectors of a UNet call) with each prompt's conditional rows set to the
        pooled vector of its text at ``step``; None when there is nothing to switch."""
        if self._pooled_by_step is None or step is None or layout is None or not layout.rows:
            return None
        if text_embeds.shape[0] != layout.batch_size:
            raise ScheduleError(f"the call's pooled text embeddings have {text_embeds.shape[0]} rows, its batch "
                                f"{layout.batch_size}: pass schedule.pipeline_kwargs() to the pipeline")
        text_embeds = text_embeds.clone()
        position = self._position(step)
        for cond, index, steps in self._switched(pooled=True):
            rows = layout.row_indices(cond=cond, prompt=index)
            if rows:
                text_embeds[rows] = steps[min(position, steps.shape[0] - 1)].to(text_embeds.device, text_embeds.dtype)
        return text_embeds

    def _position(self, step: int) -> int:
        """Where this denoiser call reads the schedule: its step, or on a second-order sampler its call."""
        if self._calls is None:
            return step
        scheduler = self.pipe.scheduler
        index = getattr(scheduler, "step_index", None)
        if index is None:
            raise ScheduleError(f"{type(scheduler).__name__} calls the denoiser twice a step, and A1111's schedule "
                                "is read per call, but the scheduler does not say which call this is (its "
                                "step_index is unset): call scheduler.scale_model_input before the denoiser, "
                                "as diffusers' pipelines do")
        return index - (getattr(scheduler, "begin_index", None) or 0)

    def _switched(self, pooled: bool = False) -> list[tuple[bool, int, torch.Tensor]]:
        """(conditional?, prompt, per-step rows) of every schedule this call follows: each prompt's, and each
        scheduled negative prompt's for the unconditional rows."""
        prompts = self._pooled_by_step if pooled else self._by_step
        negatives = [(False, index, pair[1] if pooled else pair[0]) for index, pair in self._negative_by_step.items()]
        return [(True, index, steps) for index, steps in enumerate(prompts or [])] + negatives

    def context(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        if self._by_step is None or ctx.step is None:
            return None
        if x.shape[1] != self._length:
            raise ScheduleError(f"the call's text has {x.shape[1]} slots, the schedule's {self._length}: pass "
                                "schedule.pipeline_kwargs() to the pipeline")
        x = x.clone()
        position = self._position(ctx.step)
        for cond, index, steps in self._switched():
            rows = ctx.layout.row_indices(cond=cond, prompt=index)
            if rows:
                x[rows] = steps[min(position, steps.shape[0] - 1)].to(x.device, x.dtype)
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
    def _encoded(self, index: int, text: str) -> tuple:
        key = (index, text)
        if key not in self._cache:
            self._check_chunks(self._chunks, index, text, "this schedule", self.written[index])
            embeds = encode_prompt(self.pipe, text, self._first_negative(index), syntax=TEXT_SYNTAX,
                                   emphasis=self.emphasis)
            pooled = embeds.pooled_prompt_embeds
            self._cache[key] = (embeds.prompt_embeds[0], None if pooled is None else pooled[0])
        return self._cache[key]

    def _check_chunks(self, counts: dict[int, int], index: int, text: str, what: str, written: str) -> None:
        """Every text of one schedule must fill the first text's number of 75-token chunks (``counts[index]``)."""
        chunks = len(token_chunks(self.pipe.tokenizer, _text_prompt(text))[0])
        expected = counts.setdefault(index, chunks)
        if chunks != expected:
            raise UnsupportedSyntaxError(
                f"the texts of {what} fill different numbers of 75-token chunks ({expected} and {chunks}, "
                f"{text!r}); A1111 pads them in a way xattn does not reproduce: keep every text within the "
                "same number of chunks", written, 0)

    def _first_negative(self, index: int) -> str:
        """The first text of prompt ``index``'s negative prompt (the one the pipeline is called with)."""
        negative = self.negatives[index]
        return sub_prompts(negative)[0] if has_schedule(negative) else negative

    def _negative_of(self, index: int, negative: str) -> tuple:
        """``([1, 77k, d], [1, d2] or None)`` of one text of prompt ``index``'s negative prompt. On SDXL an empty
        negative prompt (the whole of it) is zeros where the pipeline zeroes it (``force_zeros_for_empty_prompt``:
        diffusers' ``pipe(prompt)``, and A1111 on SDXL); an empty text of a scheduled negative is encoded."""
        key = (index, negative)
        if key not in self._negative_cache:
            self._check_chunks(self._negative_chunks, index, negative, "this negative prompt", self.negatives[index])
            embeds = encode_prompt(self.pipe, "", negative, syntax=TEXT_SYNTAX, emphasis=self.emphasis)
            hidden, pooled = embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds
            if self.sdxl and self.negatives[index] == "" and \
                    getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
                hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
            self._negative_cache[key] = (hidden, pooled)
        return self._negative_cache[key]

    def _initial(self, index: int) -> tuple:
        """The text the pipeline is called with: the first that differs from the negative prompt's rows
        (the session tells conditional from unconditional rows by their values)."""
        texts = sub_prompts(self.prompts[index])
        uncond = self._uncond[index][0][0]
        for text in texts:
            row = self._encoded(index, text)[0]
            if row.shape != uncond.shape or not torch.equal(row, uncond):
                return self._encoded(index, text)
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


def second_order_calls(scheduler) -> int | None:
    """The denoiser calls of a run of a second-order sampler (Heun, KDPM2: 2N - 1 for N steps), or None for a
    sampler that calls the denoiser once a step. A1111 (since 1.1, "fix prompt schedule for second order
    samplers") lays a prompt schedule over twice the step count and moves along it at every call."""
    timesteps = getattr(scheduler, "timesteps", None)
    if getattr(scheduler, "order", 1) != 2 or timesteps is None or not len(timesteps):
        return None
    return len(timesteps) - (getattr(scheduler, "begin_index", None) or 0)


def _read(text: str) -> str:
    """A written prompt as the schedule reads it: extra networks stripped (warned), AND refused."""
    stripped = strip_extra_networks(text)
    refuse_composition(stripped)
    return stripped


def _text_prompt(text: str):
    from . import parse_prompt

    return parse_prompt(text, syntax=TEXT_SYNTAX)


class _Handles:
    """Forward pre-hooks on several modules, removed together."""

    def __init__(self):
        self.handles: list = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def pooled_hook(session, schedule: PromptSchedule) -> _Handles:
    """Forward pre-hooks on the session's denoiser (and any ControlNet), after the runtime's (which knows the step
    and the rows), that give SDXL's pooled vector (``added_cond_kwargs["text_embeds"]``) the schedule's text at
    each step. They remove themselves at the first call after ``session`` closed (sessions tell controllers no end)."""
    owner, target = weakref.ref(session), weakref.ref(schedule)
    handles = _Handles()

    def hook_for(module):
        signature = inspect.signature(module.forward)

        def before(module, args, kwargs):
            session, schedule = owner(), target()
            runtime = getattr(session, "_runtime", None)
            if schedule is None or runtime is None or schedule._handle is not handles:
                handles.remove()
                return None
            bound = signature.bind_partial(*args, **kwargs)
            added, call = bound.arguments.get("added_cond_kwargs"), runtime.call
            if not added or added.get("text_embeds") is None or call is None:
                return None
            switched = schedule.pooled(added["text_embeds"], call.layout, call.step)
            if switched is None:
                return None
            bound.arguments["added_cond_kwargs"] = {**added, "text_embeds": switched}
            return bound.args, bound.kwargs

        return before

    for host in session.hosts.values():
        handles.handles.append(host.register_forward_pre_hook(hook_for(host), with_kwargs=True))
    return handles


def _check_pipeline(pipe, prompt: str) -> None:
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise UnsupportedSyntaxError(f"prompt editing / alternation runs on Stable Diffusion 1.x/2.x and SDXL "
                                     f"pipelines, not {type(pipe).__name__}", prompt, max(prompt.find("["), 0))
    if getattr(pipe, "text_encoder_2", None) is not None and \
            getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        raise UnsupportedSyntaxError(f"prompt editing / alternation on {type(pipe).__name__}: its UNet takes no "
                                     "pooled text vector (addition_embed_type 'text_time'), so xattn cannot "
                                     "switch it as A1111 does", prompt, max(prompt.find("["), 0))

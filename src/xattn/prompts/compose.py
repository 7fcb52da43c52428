r"""A1111's ``AND`` (composable diffusion, Liu et al. 2022): one noise prediction per sub-prompt, combined.

The rules, restated from A1111's documentation (the wiki's "Composable-Diffusion"
section; this is an independent implementation):

* A prompt is split at every ``AND`` written in capitals as a whole word
  (``ANDROID``, ``and`` are text). The split comes first, on the prompt as
  written: brackets do not protect an ``AND``.
* Each sub-prompt may end in a weight: a colon, optional spaces, a number
  ``[+-]`` digits with at most one ``.`` (``2``, ``0.7``, ``.5``, ``1.``, ``-1``;
  no exponent), then only spaces. Spaces before the colon go with it:
  ``a cat :1.2`` is the text ``a cat`` with weight 1.2. Without such an end
  the weight is 1 and the text is the sub-prompt without its trailing spaces
  (leading spaces stay; the tokenizer ignores them). Negative weights are allowed.
* A prompt without ``AND`` is one sub-prompt, so a trailing weight applies to it
  too: ``a cat:0.5`` is ``a cat`` at weight 0.5 (and ``photo 16:9`` is ``photo 16``
  at weight 9, as in A1111).
* Each sub-prompt is then an ordinary prompt: emphasis, ``BREAK``, prompt editing
  and alternation (scheduled per sub-prompt, as A1111 schedules them).

A1111 combines the denoised predictions as ``uncond + Σ_i w_i (cond_i - uncond) · cfg``.
:class:`ComposedPrompt` replaces, at every denoiser call, the conditional rows'
prediction by ``ε_u + Σ_i w_i (ε_i - ε_u)``; the pipeline's guidance
``ε_u + s (ε_c - ε_u)`` then gives exactly A1111's combination. The denoiser runs
once per call on a batch of ``1 + k`` rows per image (the unconditional row, then
one row per sub-prompt), so controllers see the sub-prompts as the call's prompts:
``Capture().maps().word("square", prompt=1)`` is the map of ``square`` in sub-prompt 1
(:meth:`ComposedPrompt.prompt_of` finds which sub-prompt holds a word).

Without classifier-free guidance (``guidance_scale <= 1``, where diffusers makes
no unconditional row) the unconditional row is added from the negative prompt, and
the pipeline's single prediction is ``ε_u + Σ_i w_i (ε_i - ε_u)``: A1111's result at
CFG scale 1 (A1111 keeps computing the unconditional prediction then). With one
sub-prompt of weight 1 that is the plain prompt's prediction.

On SDXL each row also carries its own pooled text vector (``added_cond_kwargs["text_embeds"]``):
a sub-prompt's row gets that sub-prompt's pooled output (second encoder, first 75-token chunk;
per step when it holds prompt editing), the unconditional row the negative prompt's, and every
row the time ids of its image, as A1111's per-sub-prompt conditioning holds ``crossattn`` and ``vector``.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import NamedTuple

import torch

from ..errors import XattnError
from ..hookpoints import BatchLayout, Controller, HookContext, Row, Run
from ..selector import Selector
from ..tokens import TokenError, TokenMap
from .a1111 import strip_extra_networks
from .editing import has_schedule
from .types import UnsupportedSyntaxError

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"\s*:\s*([+-]?(?:\d+\.?|\d*\.\d+))\s*$")


class SubPrompt(NamedTuple):
    """One part of a composed prompt: its text and its weight."""

    text: str
    weight: float


class CompositionError(XattnError, ValueError):
    """A composed prompt that cannot run in this call (other embeddings, a nested denoiser call...)."""


def split_composition(prompt: str) -> list[SubPrompt]:
    """A1111's sub-prompts of ``prompt``: split at ``AND``, each with its trailing ``:weight`` (default 1).

    >>> split_composition("a red circle AND a blue square :0.7")
    [SubPrompt(text='a red circle', weight=1.0), SubPrompt(text=' a blue square', weight=0.7)]
    """
    parts = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)
        if match:
            parts.append(SubPrompt(part[: match.start()], float(match.group(1))))
        else:
            parts.append(SubPrompt(part.rstrip(), 1.0))
    return parts


def is_composed(prompt: str) -> bool:
    """True when A1111 reads ``prompt`` as more than one plain prompt at weight 1: ``AND``, or a trailing ``:w``."""
    return bool(_AND.search(prompt)) or bool(_WEIGHT.search(prompt))


class ComposedPrompt(Controller):
    """Run an A1111 prompt with ``AND`` (and sub-prompt weights) as composable diffusion.

    Args:
        pipe: a Stable Diffusion 1.x/2.x or SDXL pipeline (ControlNet is refused by name).
        prompt: the prompt as written, e.g. ``"a red circle AND a blue square :0.7"``.
        negative_prompt: the negative prompt (one, shared by every sub-prompt, as in A1111);
            no ``AND`` or prompt editing in it.
        emphasis: apply A1111's weights to the embeddings (as :func:`xattn.prompts.encode_prompt`).

    Usage::

        composed = ComposedPrompt(pipe, "a red circle AND a blue square :0.7")
        with composed.hooks(capture):            # xattn.hooks(pipe, composed, capture, ...) + the denoiser wrapper
            image = pipe(**composed.pipeline_kwargs(), num_inference_steps=20).images[0]

    Each sub-prompt is encoded once (its prompt-editing texts once each). Every
    sub-prompt must fill the same number of 75-token chunks (A1111 pads differing
    ones with copies of their last vector, which xattn does not reproduce).
    """

    selector = Selector(kind="cross")

    def __init__(self, pipe, prompt: str, negative_prompt: str = "", emphasis: bool = True):
        from .schedule import PromptSchedule

        _check_pipeline(pipe, prompt)
        self.pipe, self.written = pipe, prompt
        self.negative = strip_extra_networks(negative_prompt)
        if _AND.search(self.negative):
            raise UnsupportedSyntaxError("AND in the negative prompt is not supported (A1111 does not compose the "
                                         "negative prompt either)", negative_prompt, _AND.search(self.negative).start())
        self.parts = split_composition(strip_extra_networks(prompt))
        self.texts = [part.text for part in self.parts]
        self.weights = [part.weight for part in self.parts]
        # One PromptSchedule over the sub-prompts: their encodings, and per-step texts where they hold editing.
        self._schedule = PromptSchedule(pipe, self.texts, [self.negative] * len(self.texts), emphasis=emphasis)
        chunks = set(self._schedule._chunks.values())
        if len(chunks) > 1:
            raise UnsupportedSyntaxError(
                f"the sub-prompts fill different numbers of 75-token chunks ({sorted(chunks)}); A1111 pads them with "
                "copies of their last vector, which xattn does not reproduce: keep every sub-prompt within the same "
                "number of chunks", prompt, 0)
        self._edited = any(has_schedule(text) for text in self.texts)
        kwargs = self._schedule.pipeline_kwargs()
        self._subs = kwargs["prompt_embeds"]  # [k, L, d]
        self._uncond = kwargs["negative_prompt_embeds"][:1]  # [1, L, d]
        self._pooled = kwargs.get("pooled_prompt_embeds")  # SDXL: [k, d2]
        self._uncond_pooled = None if self._pooled is None else kwargs["negative_pooled_prompt_embeds"][:1]
        self._session = None
        self._active = False
        self._layouts: dict[int, BatchLayout] = {}

    # -- what the call needs ---------------------------------------------------------------
    def pipeline_kwargs(self) -> dict:
        """``prompt_embeds`` (the first sub-prompt) and ``negative_prompt_embeds`` for ``pipe(...)`` (SDXL: and
        the pooled ones)."""
        kwargs = {"prompt_embeds": self._subs[:1], "negative_prompt_embeds": self._uncond}
        if self._pooled is not None:
            kwargs.update(pooled_prompt_embeds=self._pooled[:1], negative_pooled_prompt_embeds=self._uncond_pooled)
        return kwargs

    def hook_kwargs(self) -> dict:
        """``prompts=`` (the sub-prompts) and ``tokenizer=`` for ``xattn.hooks``."""
        from .schedule import ScheduleTokenizer

        return {"prompts": list(self.texts), "tokenizer": ScheduleTokenizer(self.pipe.tokenizer)}

    @contextmanager
    def hooks(self, *controllers: Controller):
        """``xattn.hooks(pipe, self, *controllers)`` with the denoiser wrapper that runs the sub-prompts."""
        from ..session import hooks

        with hooks(self.pipe, self, *controllers, **self.hook_kwargs()) as session:
            handles = self._install(session)
            try:
                yield session
            finally:
                for handle in handles:
                    handle.remove()

    def prompt_of(self, word: str) -> int:
        """The index of the sub-prompt holding ``word`` (for ``maps().word(word, prompt=...)``).

        Raises :class:`xattn.TokenError` when no sub-prompt has it, or more than one does.
        """
        tokenizer = self.hook_kwargs()["tokenizer"]
        found = []
        for index, text in enumerate(self.texts):
            try:
                TokenMap(tokenizer, text).indices(word)
                found.append(index)
            except TokenError:
                continue
        if len(found) != 1:
            where = "none" if not found else ", ".join(f"{i} ({self.texts[i]!r})" for i in found)
            raise TokenError(f"{word!r} is in {'no' if not found else 'more than one'} sub-prompt of the composed "
                             f"prompt {self.written!r} (found in: {where}); name the sub-prompt with prompt=<index> "
                             f"(sub-prompts: {', '.join(f'{i}: {t!r}' for i, t in enumerate(self.texts))})")
        return found[0]

    # -- the run ---------------------------------------------------------------------------
    def bind(self, session) -> None:
        self._session = session

    def begin_run(self, run: Run) -> None:
        if self._edited:
            self._schedule.begin_run(run)

    def context(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        return self._schedule.context(x, ctx) if self._edited else None

    def to_dict(self) -> dict:
        return {"composed_prompt": self.written, "sub_prompts": [list(part) for part in self.parts]}

    def __repr__(self) -> str:
        return f"ComposedPrompt({self.written!r})"

    # -- the denoiser wrapper --------------------------------------------------------------
    def _install(self, session) -> list:
        denoiser = session.denoiser
        signature = inspect.signature(denoiser.forward)
        pending: list[tuple[int, bool]] = []

        def before(module, args, kwargs):
            if self._active:
                raise CompositionError("the denoiser was called again inside a composed-prompt call (a guidance "
                                       "controller's own pass?); AND does not run with steering controllers yet")
            arguments = signature.bind_partial(*args, **kwargs)
            expanded, images, cfg = self._expand(arguments.arguments, session)
            arguments.arguments.update(expanded)
            pending.append((images, cfg))
            self._active = True
            return arguments.args, arguments.kwargs

        def after(module, args, output):
            self._active = False
            images, cfg = pending.pop()
            return self._combine(output, images, cfg)

        handles = [denoiser.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                   denoiser.register_forward_hook(after)]
        if self._edited and self._pooled is not None:  # SDXL: pooled vectors by step, once the runtime knows it
            from .schedule import pooled_hook

            self._schedule._handle = pooled_hook(session, self._schedule)
            handles.append(self._schedule._handle)
        return handles

    def _expand(self, bound: dict, session) -> tuple[dict, int, bool]:
        name = "sample" if "sample" in bound else "hidden_states"
        sample, text = bound[name], bound.get("encoder_hidden_states")
        if text is None:
            raise CompositionError("a composed prompt needs the denoiser's encoder_hidden_states")
        batch = sample.shape[0]
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", batch % 2 == 0 and batch > 1))
        images = batch // 2 if cfg else batch
        cond = text[images: 2 * images] if cfg else text
        first = self._subs[0].to(text.device, text.dtype)
        if cond.shape[1:] != first.shape or not torch.allclose(cond[0], first, atol=1e-4, rtol=1e-4):
            raise CompositionError("the call's conditional rows are not the composed prompt's: pass "
                                   "composed.pipeline_kwargs() to the pipeline")
        k = len(self.texts)
        latents = sample[images:] if cfg else sample
        uncond_latents = sample[:images] if cfg else sample
        uncond_text = text[:images] if cfg else self._uncond.to(text.device, text.dtype).expand(images, -1, -1)
        subs = self._subs.to(text.device, text.dtype)
        out = {name: torch.cat([uncond_latents] + [latents] * k),
               "encoder_hidden_states": torch.cat([uncond_text] + [subs[i:i + 1].expand(images, -1, -1)
                                                                    for i in range(k)])}
        # Other per-row inputs (a per-row timestep, LCM's timestep_cond): the cond row of each image, repeated.
        source = list(range(images)) + [(images if cfg else 0) + image for _ in range(k) for image in range(images)]
        for key, value in bound.items():
            if key in out or not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch:
                continue
            out[key] = value[source]
        added = bound.get("added_cond_kwargs")
        if added:  # SDXL: time ids of each row's image; pooled vectors of the negative prompt and each sub-prompt
            out["added_cond_kwargs"] = self._added(added, source, batch, images, cfg)
        session.layout = self._layout(images)
        return out, images, cfg

    def _added(self, added: dict, source: list[int], batch: int, images: int, cfg: bool) -> dict:
        rows = {key: value[source] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch
                else value for key, value in added.items()}
        pooled = rows.get("text_embeds")
        if pooled is None or self._pooled is None:
            return rows
        subs = self._pooled.to(pooled.device, pooled.dtype)
        given = added["text_embeds"][images: 2 * images] if cfg else added["text_embeds"]
        if given.shape[1:] != subs.shape[1:] or not torch.allclose(given, subs[:1].expand_as(given), atol=1e-4,
                                                                   rtol=1e-4):
            raise CompositionError("the call's pooled text embeddings are not the composed prompt's: pass "
                                   "composed.pipeline_kwargs() to the pipeline")
        pooled = pooled.clone()
        if not cfg:
            pooled[:images] = self._uncond_pooled.to(pooled.device, pooled.dtype)
        for index in range(len(self.texts)):
            pooled[images * (1 + index): images * (2 + index)] = subs[index]
        rows["text_embeds"] = pooled
        return rows

    def _layout(self, images: int) -> BatchLayout:
        if images not in self._layouts:
            tokenizer = self.hook_kwargs()["tokenizer"]
            rows = tuple(Row(False, 0, image) for image in range(images)) + tuple(
                Row(True, index, image) for index in range(len(self.texts)) for image in range(images))
            self._layouts[images] = BatchLayout(rows=rows, prompts=tuple(self.texts),
                                                token_maps=tuple(TokenMap(tokenizer, t) for t in self.texts),
                                                negative_prompts=(self.negative,) * len(self.texts))
        return self._layouts[images]

    def _combine(self, output, images: int, cfg: bool):
        prediction = output[0] if isinstance(output, (tuple, list)) else output.sample
        uncond = prediction[:images]
        base = uncond.double()  # the sum in float64: the result is then one rounding from exact
        combined = base.clone()
        for index, weight in enumerate(self.weights):
            part = prediction[images * (1 + index): images * (2 + index)].double()
            combined = combined + weight * (part - base)
        combined = combined.to(prediction.dtype)
        result = torch.cat([uncond, combined]) if cfg else combined
        if isinstance(output, tuple):
            return (result, *output[1:])
        if isinstance(output, list):
            return [result, *output[1:]]
        output.sample = result
        return output


def _check_pipeline(pipe, prompt: str) -> None:
    column = _AND.search(prompt).start() if _AND.search(prompt) else max(prompt.rfind(":"), 0)
    if getattr(pipe, "controlnet", None) is not None:
        raise UnsupportedSyntaxError("AND (composable diffusion) with a ControlNet is not supported: its residuals "
                                     "come for the pipeline's rows, not one row per sub-prompt", prompt, column)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise UnsupportedSyntaxError(f"AND (composable diffusion) runs on Stable Diffusion 1.x/2.x and SDXL "
                                     f"pipelines, not {type(pipe).__name__}", prompt, column)

"""The runtime: per-denoiser state that joins the lifecycle, the clock, the adapters and dispatch.

One runtime per denoiser is shared by nested sessions. A forward pre-hook on
the denoiser reads each call's latent size, timestep and text batch; the step
comes from :class:`xattn.clock.StepClock`, the batch layout from the
pipeline's adapter (:mod:`xattn.adapters`); :mod:`xattn.lifecycle` tells it
where a pipeline call starts and ends and where steps end, so it can call
each controller's ``begin_run``, ``before_step`` and ``on_step_end``;
:mod:`xattn.dispatch` decides per attention call which hooks run.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import lifecycle, steering
from .adapters import Encoded, adapter_for, combine, layout_of_pipeline_call, layout_without_encoding
from .clock import StepClock
from .dispatch import ActiveHooks, active_hooks, plan_sites
from .errors import UnsupportedProcessorError
from .hookpoints import BatchLayout, Controller, HookContext, Run
from .sites import Site, attention_hosts, latent_size, resolution_of, sites as list_sites

if TYPE_CHECKING:
    from .session import Session

# Keyword groups a denoiser call may carry for its processors; only LoRA's ``scale`` is consumed before them.
_PROCESSOR_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
_CONSUMED_KWARGS = {"scale"}
# Keywords xattn's IP-Adapter processor takes as diffusers' does (``cross_attention_kwargs`` only).
_IP_KWARGS = {"ip_adapter_masks"}


@dataclass
class _CallState:
    """What the current denoiser call is: read once in the pre-hook."""

    latent_hw: tuple[int, int]
    step: int | None
    num_steps: int | None
    timestep: float | None
    layout: BatchLayout


def _without_concepts(text):
    """The prompt's text rows: concept rows that :func:`xattn.concepts` appended are not the prompt's."""
    from .concepts import live_stream

    stream = live_stream()
    if text is None or stream is None or text.shape[1] != stream.found.text_rows + stream.rows:
        return text
    return text[:, : stream.found.text_rows]


class Runtime:
    """Per-denoiser state shared by nested sessions."""

    def __init__(self, denoiser: nn.Module, pipe):
        self.denoiser = denoiser
        self.pipe = pipe
        self.sessions: list[Session] = []
        owner = pipe if pipe is not None else denoiser
        self.site_by_name = {site.name: site for site in list_sites(owner)}
        self.entries: dict = {}
        self.clock = StepClock()
        self.adapter = adapter_for(pipe) if pipe is not None else None
        self.call: _CallState | None = None
        self.run: Run | None = None
        self._in_pipeline_call = False
        self._last_step: int | None = None
        self._selected: set[int] = set()  # controllers whose selector matched some call of this run
        self._latents: torch.Tensor | None = None  # the pipeline's latents, for steering controllers
        self._steering: tuple | None = None  # (controller, layout) during a steering controller's own pass
        self._call_of_steer: _CallState | None = None  # the denoiser call a steering pass stands in for
        self._encoded: Encoded | None = None
        self._layouts: dict[tuple, BatchLayout] = {}  # the layouts of this pipeline call's distinct text batches
        self._signatures: dict[int, inspect.Signature] = {}
        self._handles = []
        for host in attention_hosts(owner).values():  # the denoiser and any ControlNets: one clock, one run
            self._signatures[id(host)] = inspect.signature(host.forward)
            self._handles += [host.register_forward_pre_hook(self._before_call, with_kwargs=True),
                              host.register_forward_hook(self._after_call)]
        self._encode_wrapped = pipe is not None and lifecycle.observe(pipe, "encode_prompt", self._encoded_by_pipeline)
        if pipe is not None:
            lifecycle.watch(pipe, self)

    # -- sessions and controllers --------------------------------------------
    def controllers(self) -> list[Controller]:
        return [c for session in self.sessions for c in session.controllers]

    def rebuild(self) -> None:
        """Recompute which controller points statically apply to each site."""
        self.entries = plan_sites(self.controllers(), list(self.site_by_name.values()))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._encode_wrapped:
            lifecycle.stop_observing(self.pipe, "encode_prompt")
        if self.pipe is not None:
            lifecycle.unwatch(self.pipe)
        RUNTIMES.pop(self.denoiser, None)

    def _scheduler(self):
        for owner in (self.sessions[-1] if self.sessions else None, self.pipe):
            scheduler = getattr(owner, "scheduler", None)
            if scheduler is not None:
                return scheduler
        return None

    # -- the run lifecycle -----------------------------------------------------
    def run_pipeline(self, call, pipe, args, kwargs):
        """One pipeline call: a run starts, step ends are chained, the run ends with the call."""
        steers = any(c.wants_before_step() for c in self.controllers())
        if steers or any(c.wants_step_end() for c in self.controllers()):
            kwargs = lifecycle.with_step_end(call, pipe, kwargs, self._step_ended, self._settled)
        observing = steers and lifecycle.observe(pipe, "prepare_latents", self._prepared)
        outer = self._in_pipeline_call
        self._in_pipeline_call, self._encoded, self.run, self._latents = True, None, None, None
        try:
            result = call(pipe, *args, **kwargs)
            self._end_run()
            return result
        finally:
            self.run = None  # a failed call ends its run without the end-of-run checks
            self._in_pipeline_call, self._latents = outer, None
            if observing:
                lifecycle.stop_observing(pipe, "prepare_latents")

    def _settled(self, latents: torch.Tensor) -> None:
        self._latents = latents  # the tensor the pipeline steps next

    def _prepared(self, arguments: dict, result) -> None:
        self._settled(result[0] if isinstance(result, (tuple, list)) else result)  # Flux also returns its ids

    def _begin_run(self, run: Run) -> None:
        self._end_run()
        self.run, self._last_step, self._selected = run, None, set()
        for controller in self.controllers():
            controller.begin_run(run)

    def _end_run(self) -> None:
        if self.run is None:
            return
        for controller in [c for c in self.controllers() if id(c) not in self._selected]:
            warnings.warn(f"{controller!r} ran at no attention call of this run: its selector "
                          f"'{controller.selector}' matched no site at this latent size and these steps",
                          stacklevel=2)
        self.run = None

    def _step_ended(self, timestep, latents: torch.Tensor) -> torch.Tensor | None:
        scheduler = self._scheduler()
        value = float(torch.as_tensor(timestep).flatten()[0].item())
        if self.run is None or not self.clock.ends_step(value, scheduler):
            return None
        step, _ = self.clock.step_at(value, scheduler)  # the callback's t: scheduler units
        changed = None
        for controller in self.controllers():
            if controller.wants_step_end():
                out = controller.on_step_end(step, latents if changed is None else changed)
                if out is not None:
                    changed = out
        return changed

    # -- per denoiser call -----------------------------------------------------
    @torch.compiler.disable  # bookkeeping on Python state: eager under torch.compile, never a guard
    def _before_call(self, module, args, kwargs):
        arguments = self._signatures[id(module)].bind_partial(*args, **kwargs)
        bound = arguments.arguments
        if self._steering is not None:  # a steering controller's own pass: its layout, no lifecycle
            sample = bound.get("sample", bound.get("hidden_states"))
            call = self._call_of_steer
            self.call = _CallState(latent_size(sample, bound), call.step, call.num_steps, call.timestep,
                                   self._steering[1])
            return None
        self._check_processor_kwargs(bound)
        sample = bound.get("sample", bound.get("hidden_states"))
        timestep = bound.get("timestep")
        text = _without_concepts(bound.get("encoder_hidden_states"))
        timestep_value = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0].item())
        if self._in_pipeline_call and self.run is None:
            self.clock.new_run(relative=True)  # step 0 is the first step this pipeline call takes
        step, num_steps = self.clock.step_of(timestep_value, self._scheduler())
        layout = self._layout_of(text, sample.shape[0])
        latent_hw = latent_size(sample, bound)
        if self._starts_run(layout, step):
            if not self._in_pipeline_call:
                self.clock.new_run()
                step, num_steps = self.clock.step_of(timestep_value, self._scheduler())
            self._begin_run(Run(layout, num_steps, latent_hw))
        first_of_step = step is not None and step != self._last_step
        if step is not None:
            self._last_step = step
        self.call = _CallState(latent_hw, step, num_steps, timestep_value, layout)
        if first_of_step and self._in_pipeline_call and any(c.wants_before_step() for c in self.controllers()):
            if module is not self.denoiser:
                raise lifecycle.LifecycleError(f"guidance cannot steer {type(self.pipe).__name__} yet: a "
                                               f"{type(module).__name__} runs before its denoiser in each step")
            name = "sample" if "sample" in bound else "hidden_states"
            steered = self._steer(module, arguments, name, timestep)
            self.call = _CallState(latent_hw, step, num_steps, timestep_value, layout)  # the passes had theirs
            if steered is not None:
                bound[name] = steered
                return arguments.args, arguments.kwargs
        return None

    def _steer(self, module, arguments, name: str, timestep) -> torch.Tensor | None:
        """Run the steering controllers before this step; the new denoiser input, or None."""
        self._call_of_steer = self.call

        def steering_pass(controller, layout):
            self._steering = None if controller is None else (controller, layout)

        return steering.steer(module, arguments, name, timestep, self.call.step, self.call.layout, self._latents,
                              self._scheduler(), [c for c in self.controllers() if c.wants_before_step()],
                              steering_pass, type(self.pipe).__name__)

    def _starts_run(self, layout: BatchLayout, step: int | None) -> bool:
        if self.run is None:
            return True
        if self._in_pipeline_call:
            return False
        # A bare model call: a new run when the batch changes or the clock goes back.
        return layout != self.run.layout or (step is not None and self._last_step is not None and step < self._last_step)

    @torch.compiler.disable
    def _after_call(self, module, args, output):
        self.call = None

    def _check_processor_kwargs(self, bound: dict) -> None:
        for group in _PROCESSOR_KWARGS:
            given = bound.get(group) or {}
            unknown = set(given) - _CONSUMED_KWARGS
            if group == "cross_attention_kwargs" and unknown & _IP_KWARGS and self._has_ip_processor():
                unknown -= _IP_KWARGS  # xattn's IP-Adapter processor applies them as diffusers' does
            unknown = sorted(unknown)
            if unknown:
                raise UnsupportedProcessorError(
                    f"{group} {unknown} would go to attention processors, and xattn's processor takes none "
                    "(diffusers would drop them silently); remove them or close the xattn session")

    def _has_ip_processor(self) -> bool:
        from .ip_adapter import XattnIPAdapterProcessor

        processors = getattr(self.denoiser, "attn_processors", {})
        return any(isinstance(p, XattnIPAdapterProcessor) for p in processors.values())

    @torch.compiler.disable  # Python bookkeeping: under torch.compile it runs eagerly, so steps never recompile
    def active_hooks(self, site: Site, query_length: int) -> ActiveHooks | None:
        """Hooks that run at ``site`` in this call, or None for the fused fast path."""
        entries = self.entries.get(site.name)
        if entries and self._steering is not None:  # a steering pass: its controller's hooks, and the conditioning's
            entries = [entry for entry in entries if entry[0] is self._steering[0] or entry[0].conditions]
        if not entries:
            return None
        call = self.call
        if call is None:  # called outside a tracked denoiser call (e.g. a bare attention module)
            side = math.isqrt(query_length)
            call = _CallState((side, query_length // max(side, 1)), None, None, None, BatchLayout(rows=()))
        res = resolution_of(query_length, call.latent_hw)
        context = HookContext(site, "", res, call.step, call.num_steps, call.timestep, call.layout, call.latent_hw)
        for controller, _, _ in entries:
            if controller.selector.matches_res(res) and controller.selector.matches_step(call.step, call.num_steps):
                self._selected.add(id(controller))
        return active_hooks(entries, context)

    # -- batch layout ----------------------------------------------------------
    def _layout_of(self, text: torch.Tensor | None, batch_size: int) -> BatchLayout:
        override = next((s.layout for s in reversed(self.sessions) if s.layout is not None), None)
        prompts = next((s.prompts for s in reversed(self.sessions) if s.prompts is not None), None)
        tokenizer = next((s.tokenizer for s in reversed(self.sessions) if s.tokenizer is not None), None)
        if override is not None or text is None or self._encoded is None:
            key = ("bare", batch_size, id(override), None if prompts is None else tuple(prompts), id(tokenizer),
                   text is None)
            build = lambda: layout_without_encoding(batch_size, override, prompts,  # noqa: E731
                                                    tokenizer if text is not None else None)
        else:
            key = (id(text), text.data_ptr(), text._version, tuple(text.shape), id(self._encoded))
            build = lambda: layout_of_pipeline_call(text, self._encoded, self.adapter, self.pipe,  # noqa: E731
                                                    prompts, tokenizer)
        # One object per distinct text batch, so a run keeps its layout; two at most, for Flux's true CFG,
        # whose calls alternate the prompts' and the negative prompts' text (each tokenized once, not each call).
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= 2:
                self._layouts.clear()
            layout = self._layouts[key] = build()
        return layout

    def _encoded_by_pipeline(self, arguments: dict, result) -> None:
        """What ``encode_prompt`` was called with and returned, read by the pipeline's adapter."""
        adapter = self.adapter
        new = adapter.encoded(arguments, result) if adapter is not None else Encoded(None, [], 1, None, None)
        # Flux's true CFG encodes its negative prompt in a second call: the unconditional rows (adapters.combine)
        self._encoded = combine(self._encoded, new, adapter, self.controllers(), type(self.pipe).__name__)
        self._layouts.clear()  # layouts name the encoded prompts: build them again for the new ones


RUNTIMES: "weakref.WeakKeyDictionary[nn.Module, Runtime]" = weakref.WeakKeyDictionary()


__all__ = ["RUNTIMES", "Runtime"]

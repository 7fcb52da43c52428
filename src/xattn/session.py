"""Scoped sessions: install xattn processors, run controllers, restore everything.

``with xattn.hooks(pipe, *controllers) as session:`` checks every selected
site's processor (:mod:`xattn.install`), installs an
:class:`~xattn.processor.XattnProcessor` on them, and on exit puts back
exactly the processors that were there, after an exception too. Sessions
nest: an inner session adds its controllers and removes only its own.

A runtime per denoiser, shared by nested sessions, joins the pieces:

- a forward pre-hook reads each denoiser call's latent size, timestep and
  text batch; the step comes from :class:`xattn.clock.StepClock`, the batch
  layout from the pipeline's adapter (:mod:`xattn.adapters`);
- the run lifecycle (:mod:`xattn.lifecycle`) tells it when a pipeline call
  starts and ends and where steps end; it calls each controller's
  ``begin_run`` at the first denoiser call of a run and ``on_step_end``
  after each step;
- :mod:`xattn.dispatch` decides per attention call which hooks run.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from . import install as installer
from . import lifecycle
from .adapters import Encoded, adapter_for, layout_of_pipeline_call, layout_without_encoding
from .clock import StepClock
from .dispatch import ActiveHooks, active_hooks, describe_sites, plan_sites
from .errors import LayoutError, NothingSelectedError, UnsupportedProcessorError
from .hookpoints import BatchLayout, Controller, Hook, HookContext, HookFn, Run
from .processor import XattnProcessor
from .selector import Selector
from .sites import Site, denoiser_of, latent_size, resolution_of, sites as list_sites

# Keyword groups a denoiser call may carry for its processors; only LoRA's ``scale`` is consumed before them.
_PROCESSOR_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
_CONSUMED_KWARGS = {"scale"}


@dataclass
class _CallState:
    """What the current denoiser call is: read once in the pre-hook."""

    latent_hw: tuple[int, int]
    step: int | None
    num_steps: int | None
    timestep: float | None
    layout: BatchLayout


class _Runtime:
    """Per-denoiser state shared by nested sessions."""

    def __init__(self, denoiser: nn.Module, pipe):
        self.denoiser = denoiser
        self.pipe = pipe
        self.sessions: list[Session] = []
        self.site_by_name = {site.name: site for site in list_sites(denoiser)}
        self.entries: dict = {}
        self.clock = StepClock()
        self.adapter = adapter_for(pipe) if pipe is not None else None
        self.call: _CallState | None = None
        self.run: Run | None = None
        self._in_pipeline_call = False
        self._last_step: int | None = None
        self._selected: set[int] = set()  # controllers whose selector matched some call of this run
        self._encoded: Encoded | None = None
        self._layout_key: tuple | None = None
        self._layout: BatchLayout | None = None
        self._forward_signature = inspect.signature(denoiser.forward)
        self._pre_hook = denoiser.register_forward_pre_hook(self._before_call, with_kwargs=True)
        self._post_hook = denoiser.register_forward_hook(self._after_call)
        self._encode_wrapped = self._wrap_encode_prompt(pipe)
        if pipe is not None:
            lifecycle.watch(pipe, self)

    # -- sessions and controllers --------------------------------------------
    def controllers(self) -> list[Controller]:
        return [c for session in self.sessions for c in session.controllers]

    def rebuild(self) -> None:
        """Recompute which controller points statically apply to each site."""
        self.entries = plan_sites(self.controllers(), list(self.site_by_name.values()))

    def close(self) -> None:
        self._pre_hook.remove()
        self._post_hook.remove()
        if self._encode_wrapped:
            del self.pipe.encode_prompt  # the instance attribute we set; the class method shows again
        if self.pipe is not None:
            lifecycle.unwatch(self.pipe)
        _RUNTIMES.pop(self.denoiser, None)

    def _scheduler(self):
        for owner in (self.sessions[-1] if self.sessions else None, self.pipe):
            scheduler = getattr(owner, "scheduler", None)
            if scheduler is not None:
                return scheduler
        return None

    # -- the run lifecycle -----------------------------------------------------
    def run_pipeline(self, call, pipe, args, kwargs):
        """One pipeline call: a run starts, step ends are chained, the run ends with the call."""
        if any(c.wants_step_end() for c in self.controllers()):
            kwargs = lifecycle.with_step_end(call, pipe, kwargs, self._step_ended)
        outer = self._in_pipeline_call
        self._in_pipeline_call, self._encoded, self.run = True, None, None
        try:
            return call(pipe, *args, **kwargs)
        finally:
            self._end_run()
            self._in_pipeline_call = outer

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
        step, _ = self.clock.step_of(value, scheduler)
        changed = None
        for controller in self.controllers():
            if controller.wants_step_end():
                out = controller.on_step_end(step, latents if changed is None else changed)
                if out is not None:
                    changed = out
        return changed

    # -- per denoiser call -----------------------------------------------------
    def _before_call(self, module, args, kwargs):
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        self._check_processor_kwargs(bound)
        sample = bound.get("sample", bound.get("hidden_states"))
        timestep = bound.get("timestep")
        text = bound.get("encoder_hidden_states")
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
        if step is not None:
            self._last_step = step
        self.call = _CallState(latent_hw, step, num_steps, timestep_value, layout)

    def _starts_run(self, layout: BatchLayout, step: int | None) -> bool:
        if self.run is None:
            return True
        if self._in_pipeline_call:
            return False
        # A bare model call: a new run when the batch changes or the clock goes back.
        return layout != self.run.layout or (step is not None and self._last_step is not None and step < self._last_step)

    def _after_call(self, module, args, output):
        self.call = None

    def _check_processor_kwargs(self, bound: dict) -> None:
        for group in _PROCESSOR_KWARGS:
            given = bound.get(group) or {}
            unknown = sorted(set(given) - _CONSUMED_KWARGS)
            if unknown:
                raise UnsupportedProcessorError(
                    f"{group} {unknown} would go to attention processors, and xattn's processor takes none "
                    "(diffusers would drop them silently); remove them or close the xattn session")

    def active_hooks(self, site: Site, query_length: int) -> ActiveHooks | None:
        """Hooks that run at ``site`` in this call, or None for the fused fast path."""
        entries = self.entries.get(site.name)
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
            if key != self._layout_key:  # one object per distinct call shape, so a bare run keeps its layout
                self._layout = layout_without_encoding(batch_size, override, prompts,
                                                       tokenizer if text is not None else None)
        else:
            key = (id(text), text.data_ptr(), text._version, tuple(text.shape), id(self._encoded))
            if key != self._layout_key:
                self._layout = layout_of_pipeline_call(text, self._encoded, self.adapter, self.pipe, prompts, tokenizer)
        self._layout_key = key
        return self._layout

    def _wrap_encode_prompt(self, pipe) -> bool:
        """Observe ``pipe.encode_prompt`` (instance attribute, removed on close)."""
        original = getattr(pipe, "encode_prompt", None)
        if original is None or "encode_prompt" in vars(pipe):
            return False
        signature = inspect.signature(original)
        runtime = self

        def encode_prompt(*args, **kwargs):
            result = original(*args, **kwargs)
            if runtime.adapter is not None:
                runtime._encoded = runtime.adapter.encoded(signature.bind_partial(*args, **kwargs).arguments, result)
            else:
                runtime._encoded = Encoded(None, [], 1, None, None)
            return result

        pipe.encode_prompt = encode_prompt
        return True


_RUNTIMES: "weakref.WeakKeyDictionary[nn.Module, _Runtime]" = weakref.WeakKeyDictionary()


class Session:
    """An open xattn scope on one model. Use :func:`hooks` to make one."""

    def __init__(self, model, controllers: Iterable[Controller], *, scheduler=None,
                 layout: BatchLayout | None = None, prompts: list[str] | None = None, tokenizer=None):
        self.model = model
        self.denoiser = denoiser_of(model)
        self.controllers: list[Controller] = []
        for controller in controllers:
            self._check_new(controller)
            self.controllers.append(controller)
        self.scheduler = scheduler
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if self.tokenizer is None:
                raise LayoutError("`prompts=` needs a tokenizer: pass `tokenizer=` or a pipeline")
        self.prompts = prompts
        self.layout = layout
        self.originals: dict[str, object] = {}
        self._runtime: _Runtime | None = None

    def _check_new(self, controller) -> None:
        if not isinstance(controller, Controller):
            raise TypeError(
                f"{controller!r} is not an xattn controller; wrap a function as "
                "xattn.Hook('probs', fn, selector) or subclass xattn.Controller"
            )
        running = self.controllers + (self._runtime.controllers() if getattr(self, "_runtime", None) else [])
        if any(controller is other for other in running):
            raise NothingSelectedError(f"{controller!r} is given twice; it would run twice at every call "
                                       "(make a second instance if that is what you want)")
        controller.check_selector()

    @property
    def sites(self) -> list[Site]:
        """Every attention site of the model."""
        return list_sites(self.denoiser)

    def _sites_of(self, controller: Controller) -> list[str]:
        names = [site.name for site in self.sites if controller.selector.matches_site(site)]
        if not names:
            raise NothingSelectedError(f"the selector '{controller.selector}' of {controller!r} matches no attention "
                                       f"site of {type(self.denoiser).__name__}; list them with xattn.sites(model)")
        return names

    def _selected_site_names(self) -> list[str]:
        if not self.controllers:
            return [site.name for site in self.sites]
        names: list[str] = []
        for controller in self.controllers:
            names += [name for name in self._sites_of(controller) if name not in names]
        return names

    def __enter__(self) -> "Session":
        names = self._selected_site_names()  # raises before anything changes
        installer.check_processors(self.denoiser, names)
        runtime = _RUNTIMES.get(self.denoiser)
        if runtime is None:
            runtime = _RUNTIMES[self.denoiser] = _Runtime(self.denoiser, self.model if self.model is not self.denoiser else None)
        for controller in self.controllers:
            if any(controller is other for other in runtime.controllers()):
                if not runtime.sessions:
                    runtime.close()
                raise NothingSelectedError(f"{controller!r} already runs in an enclosing xattn session")
        self._runtime = runtime
        runtime.sessions.append(self)
        try:
            installer.install(self.denoiser, names, self._processor_for, self.originals)
            runtime.rebuild()
            for controller in self.controllers:
                controller.bind(self)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _processor_for(self, name: str) -> XattnProcessor:
        return XattnProcessor(self._runtime.site_by_name[name], self._runtime)

    def __exit__(self, exc_type, exc, tb) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        if runtime.sessions and runtime.sessions[-1] is not self:
            raise RuntimeError("xattn sessions on one model must close in the reverse order they opened")
        runtime.sessions.pop()
        installer.restore(self.denoiser, self.originals)
        runtime.rebuild()
        if not runtime.sessions:
            runtime.close()
        self._runtime = None

    def add(self, controller: Controller) -> Controller:
        """Add a controller to the open session."""
        if self._runtime is None:
            raise RuntimeError("the session is not open; use it inside `with xattn.hooks(...)`")
        self._check_new(controller)
        names = self._sites_of(controller)
        installer.install(self.denoiser, names, self._processor_for, self.originals)
        self.controllers.append(controller)
        self._runtime.rebuild()
        controller.bind(self)
        return controller

    def add_hook(self, point: str, fn: HookFn, selector: Selector | str | dict | None = None) -> Hook:
        """Add ``fn`` at a point name such as ``"probs"`` or ``"up_blocks.*.attn2.probs"``."""
        return self.add(Hook(point, fn, selector))

    def describe(self) -> str:
        """Which controllers may run at which sites, and whether each runs fused or explicit (a table)."""
        entries = self._runtime.entries if self._runtime is not None else plan_sites(self.controllers, self.sites)
        return describe_sites(entries, self.sites)


def hooks(model, *controllers: Controller, scheduler=None, layout: BatchLayout | None = None,
          prompts: list[str] | None = None, tokenizer=None) -> Session:
    """Open an xattn session on a diffusers pipeline or model.

    Args:
        model: a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
            ``PixArtSigmaPipeline`` (any pipeline with a ``unet`` or
            ``transformer`` and an adapter in :mod:`xattn.adapters`), or the model itself.
        *controllers: what to do at the hook points (``Capture``, ``Reweight``, ``Hook``...).
        scheduler: where to read the timesteps when ``model`` is not a pipeline.
        layout: the batch layout, for calls whose rows xattn cannot identify.
        prompts: the prompts behind the call's conditional rows, for a bare
            model call (one per row) or a pipeline called with ``prompt_embeds``
            (e.g. from compel); unconditional rows still come from the call.
        tokenizer: how to turn ``prompts`` into token slots (default: the pipeline's).

    Raises:
        UnsupportedProcessorError: a selected site holds a processor xattn does not reproduce.
        NothingSelectedError: a selector matches no site, or a controller is given twice.

    Example::

        with xattn.hooks(pipe, xattn.Hook("probs", lambda p, ctx: print(ctx.name, ctx.step))):
            pipe("a red circle")
    """
    return Session(model, controllers, scheduler=scheduler, layout=layout, prompts=prompts, tokenizer=tokenizer)

"""Scoped sessions: install xattn processors, run controllers, restore everything.

``with xattn.hooks(pipe, *controllers) as session:`` installs an
:class:`~xattn.processor.XattnProcessor` on every site a controller selects,
and on exit puts back exactly the processors that were there, after an
exception too. Sessions nest: an inner session adds its controllers to those
already running and removes only its own.

While a session is open, a forward pre-hook on the UNet reads each call's
latent size, timestep and text batch, from which it derives, once per call:

- the step: the position of the timestep among the scheduler's distinct
  timesteps (so Heun's two calls at one noise level share a step, and DDIM,
  Euler and DPM++ count 0..N-1), never a count of layer calls;
- the batch layout: each row's text embedding is matched against the
  embeddings the pipeline's ``encode_prompt`` returned, which tells
  conditional from unconditional rows and the prompt and image of each,
  without assuming which half of the batch is which.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

from .hookpoints import EXPLICIT_POINTS, BatchLayout, Controller, Hook, HookContext, HookFn, Row
from .processor import XattnProcessor
from .selector import Selector
from .sites import Site, denoiser_of, resolution_of, sites as list_sites
from .tokens import TokenMap

_PROCESSOR_SUFFIX = ".processor"


@dataclass
class _CallState:
    """What the current UNet call is: read once in the pre-hook."""

    latent_hw: tuple[int, int]
    step: int | None
    num_steps: int | None
    timestep: float | None
    layout: BatchLayout


@dataclass
class _Encoded:
    """What the pipeline's ``encode_prompt`` returned for the current run."""

    prompts: list[str] | None
    negative_prompts: list[str | None]
    images_per_prompt: int
    prompt_embeds: torch.Tensor | None  # [n_prompts * n_images, j, d]
    negative_embeds: torch.Tensor | None


class ActiveHooks:
    """The hooks that run at one site in one call, grouped by point."""

    __slots__ = ("context", "by_point", "explicit")

    def __init__(self, context: HookContext, by_point: dict[str, list[HookFn]]):
        self.context = context
        self.by_point = by_point
        self.explicit = any(point in by_point for point in EXPLICIT_POINTS)

    def has(self, point: str) -> bool:
        return point in self.by_point

    def run(self, point: str, x: torch.Tensor) -> torch.Tensor:
        fns = self.by_point.get(point)
        if not fns:
            return x
        ctx = replace(self.context, point=point)
        for fn in fns:
            out = fn(x, ctx)
            if out is None:
                continue
            if out.shape != x.shape:
                raise ValueError(
                    f"hook {getattr(fn, '__qualname__', fn)} at {ctx.name} returned shape "
                    f"{tuple(out.shape)}; it must keep the input's shape {tuple(x.shape)}"
                )
            x = out
        return x


class _Runtime:
    """Per-denoiser state shared by nested sessions."""

    def __init__(self, denoiser: nn.Module, pipe):
        self.denoiser = denoiser
        self.pipe = pipe
        self.sessions: list[Session] = []
        self.site_by_name = {site.name: site for site in list_sites(denoiser)}
        self.call: _CallState | None = None
        self._entries: dict[str, list[tuple[Controller, str, HookFn]]] = {}
        self._encoded: _Encoded | None = None
        self._layout_key: tuple | None = None
        self._layout: BatchLayout | None = None
        self._timestep_key: tuple | None = None
        self._distinct: list[float] = []
        self._seen_timesteps: list[float] = []
        self._forward_signature = inspect.signature(denoiser.forward)
        self._pre_hook = denoiser.register_forward_pre_hook(self._before_call, with_kwargs=True)
        self._post_hook = denoiser.register_forward_hook(self._after_call)
        self._encode_wrapped = self._wrap_encode_prompt(pipe)

    # -- sessions and controllers --------------------------------------------
    def controllers(self) -> list[Controller]:
        return [c for session in self.sessions for c in session.controllers]

    def rebuild(self) -> None:
        """Recompute which controller points statically apply to each site."""
        entries: dict[str, list] = {}
        for controller in self.controllers():
            points = controller.points()
            for site in self.site_by_name.values():
                if controller.selector.matches_site(site):
                    for point, fn in points.items():
                        if point == "context" and site.kind != "cross":
                            continue
                        entries.setdefault(site.name, []).append((controller, point, fn))
        self._entries = entries

    def install(self, session: "Session", names: Iterable[str]) -> None:
        """Put our processor on ``names`` not yet ours; remember what was there."""
        current = self.denoiser.attn_processors
        changed = False
        for name in names:
            key = name + _PROCESSOR_SUFFIX
            if isinstance(current[key], XattnProcessor):
                continue
            session.originals[key] = current[key]
            current[key] = XattnProcessor(self.site_by_name[name], self)
            changed = True
        if changed:
            self.denoiser.set_attn_processor(current)

    def restore(self, session: "Session") -> None:
        if not session.originals:
            return
        current = self.denoiser.attn_processors
        current.update(session.originals)
        self.denoiser.set_attn_processor(current)
        session.originals.clear()

    def close(self) -> None:
        self._pre_hook.remove()
        self._post_hook.remove()
        if self._encode_wrapped:
            del self.pipe.encode_prompt  # the instance attribute we set; the class method shows again
        _RUNTIMES.pop(self.denoiser, None)

    # -- per call --------------------------------------------------------------
    def active_hooks(self, site: Site, query_length: int) -> ActiveHooks | None:
        """Hooks that run at ``site`` in this call, or None for the fused fast path."""
        entries = self._entries.get(site.name)
        if not entries:
            return None
        call = self.call
        if call is None:  # called outside a tracked denoiser call (e.g. a bare module)
            side = math.isqrt(query_length)
            call = _CallState((side, query_length // max(side, 1)), None, None, None, BatchLayout(rows=()))
        res = resolution_of(query_length, call.latent_hw)
        context = HookContext(site, "", res, call.step, call.num_steps, call.timestep, call.layout)
        by_point: dict[str, list[HookFn]] = {}
        for controller, point, fn in entries:
            selector = controller.selector
            if not (selector.matches_res(res) and selector.matches_step(call.step, call.num_steps)):
                continue
            if not controller.active(context):
                continue
            by_point.setdefault(point, []).append(fn)
        return ActiveHooks(context, by_point) if by_point else None

    def _before_call(self, module, args, kwargs):
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        sample = bound.get("sample", bound.get("hidden_states"))
        timestep = bound.get("timestep")
        text = bound.get("encoder_hidden_states")
        timestep_value = None
        if timestep is not None:
            timestep_value = float(torch.as_tensor(timestep).flatten()[0].item())
        step, num_steps = self._step_of(timestep_value)
        layout = self._layout_of(text, sample.shape[0])
        self.call = _CallState(tuple(sample.shape[-2:]), step, num_steps, timestep_value, layout)

    def _after_call(self, module, args, output):
        self.call = None

    # -- step clock ------------------------------------------------------------
    def _scheduler(self):
        for owner in (self.sessions[-1] if self.sessions else None, self.pipe):
            scheduler = getattr(owner, "scheduler", None)
            if scheduler is not None:
                return scheduler
        return None

    def _step_of(self, timestep: float | None) -> tuple[int | None, int | None]:
        if timestep is None:
            return None, None
        scheduler = self._scheduler()
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        if timesteps is not None and len(timesteps):
            key = (id(timesteps), len(timesteps), float(timesteps[0]), float(timesteps[-1]))
            if key != self._timestep_key:
                distinct: list[float] = []
                for value in torch.as_tensor(timesteps).flatten().tolist():
                    if not distinct or all(abs(value - d) > 1e-4 * max(1.0, abs(d)) for d in distinct):
                        distinct.append(value)
                self._distinct, self._timestep_key = distinct, key
            nearest = min(range(len(self._distinct)), key=lambda i: abs(self._distinct[i] - timestep))
            if abs(self._distinct[nearest] - timestep) <= 1e-3 * max(1.0, abs(timestep)):
                return nearest, len(self._distinct)
        # No schedule to match against: number distinct timesteps in the order they arrive.
        seen = self._seen_timesteps
        for index, value in enumerate(seen):
            if abs(value - timestep) <= 1e-6 * max(1.0, abs(timestep)):
                return index, None
        seen.append(timestep)
        return len(seen) - 1, None

    # -- batch layout ----------------------------------------------------------
    def _layout_of(self, text: torch.Tensor | None, batch_size: int) -> BatchLayout:
        override = self.sessions[-1].layout if self.sessions else None
        if override is not None:
            if override.batch_size != batch_size:
                raise ValueError(f"the given layout has {override.batch_size} rows, the call has {batch_size}")
            return override
        if text is None or self._encoded is None or self._encoded.prompt_embeds is None:
            return BatchLayout.plain(batch_size)
        key = (id(text), text.data_ptr(), text._version, tuple(text.shape), id(self._encoded))
        if key != self._layout_key:
            self._layout = _match_rows(text, self._encoded, self._tokenizer())
            self._layout_key = key
        return self._layout

    def _tokenizer(self):
        return getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)

    def _wrap_encode_prompt(self, pipe) -> bool:
        """Observe ``pipe.encode_prompt`` (instance attribute, removed on close)."""
        original = getattr(pipe, "encode_prompt", None)
        if original is None or "encode_prompt" in vars(pipe):
            return False
        signature = inspect.signature(original)
        runtime = self

        def encode_prompt(*args, **kwargs):
            result = original(*args, **kwargs)
            runtime._on_encode(signature.bind_partial(*args, **kwargs).arguments, result)
            return result

        pipe.encode_prompt = encode_prompt
        return True

    def _on_encode(self, arguments: dict, result) -> None:
        prompts = arguments.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        negatives = arguments.get("negative_prompt")
        count = len(prompts) if prompts is not None else 0
        if negatives is None or isinstance(negatives, str):
            negatives = [negatives] * count
        self._encoded = _Encoded(
            prompts=list(prompts) if prompts is not None else None,
            negative_prompts=list(negatives),
            images_per_prompt=int(arguments.get("num_images_per_prompt") or 1),
            prompt_embeds=result[0],
            negative_embeds=result[1] if len(result) > 1 else None,
        )
        self._seen_timesteps = []
        for controller in self.controllers():
            controller.reset()


def _match_rows(text: torch.Tensor, encoded: _Encoded, tokenizer) -> BatchLayout:
    """Identify each row of ``text`` [b, j, d] by equality with the encoded embeddings."""
    n_images = encoded.images_per_prompt
    candidates: list[tuple[bool, torch.Tensor | None]] = [(True, encoded.prompt_embeds), (False, encoded.negative_embeds)]
    used: set[tuple[bool, int]] = set()
    rows: list[Row] = []
    for r in range(text.shape[0]):
        row = None
        for cond, embeds in candidates:
            if embeds is None:
                continue
            for k in range(embeds.shape[0]):
                if (cond, k) not in used and embeds.shape[1:] == text.shape[1:] and torch.equal(embeds[k].to(text), text[r]):
                    used.add((cond, k))
                    row = Row(cond, k // n_images, k % n_images)
                    break
            if row is not None:
                break
        if row is None:
            # Rows the pipeline did not encode (e.g. edited embeddings): best effort, clearly plain.
            return BatchLayout.plain(text.shape[0])
        rows.append(row)
    prompts = tuple(encoded.prompts) if encoded.prompts is not None else ()
    token_maps = tuple(TokenMap(tokenizer, p) if (tokenizer is not None and p is not None) else None for p in prompts)
    return BatchLayout(rows=tuple(rows), prompts=prompts, token_maps=token_maps,
                       negative_prompts=tuple(encoded.negative_prompts))


_RUNTIMES: "weakref.WeakKeyDictionary[nn.Module, _Runtime]" = weakref.WeakKeyDictionary()


class Session:
    """An open xattn scope on one model. Use :func:`hooks` to make one."""

    def __init__(self, model, controllers: Iterable[Controller], *, scheduler=None,
                 layout: BatchLayout | None = None, prompts: list[str] | None = None, tokenizer=None):
        self.model = model
        self.denoiser = denoiser_of(model)
        self.controllers: list[Controller] = []
        for controller in controllers:
            if not isinstance(controller, Controller):
                raise TypeError(
                    f"{controller!r} is not an xattn controller; wrap a function as "
                    "xattn.Hook('probs', fn, selector) or subclass xattn.Controller"
                )
            self.controllers.append(controller)
        self.scheduler = scheduler
        if prompts is not None:
            if tokenizer is None:
                tokenizer = getattr(model, "tokenizer", None)
            if tokenizer is None:
                raise ValueError("`prompts=` needs a tokenizer: pass `tokenizer=` or a pipeline")
            layout = BatchLayout(rows=tuple(Row(True, i, 0) for i in range(len(prompts))),
                                 prompts=tuple(prompts), token_maps=tuple(TokenMap(tokenizer, p) for p in prompts))
        self.layout = layout
        self.originals: dict[str, object] = {}
        self._runtime: _Runtime | None = None

    @property
    def sites(self) -> list[Site]:
        """Every attention site of the model."""
        return list_sites(self.denoiser)

    def _selected_site_names(self) -> list[str]:
        all_sites = self.sites
        if not self.controllers:
            return [site.name for site in all_sites]
        return [site.name for site in all_sites if any(c.selector.matches_site(site) for c in self.controllers)]

    def __enter__(self) -> "Session":
        runtime = _RUNTIMES.get(self.denoiser)
        if runtime is None:
            runtime = _RUNTIMES[self.denoiser] = _Runtime(self.denoiser, self.model if self.model is not self.denoiser else None)
        self._runtime = runtime
        runtime.sessions.append(self)
        try:
            runtime.install(self, self._selected_site_names())
            runtime.rebuild()
            for controller in self.controllers:
                controller.bind(self)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        if runtime.sessions and runtime.sessions[-1] is not self:
            raise RuntimeError("xattn sessions on one model must close in the reverse order they opened")
        runtime.sessions.pop()
        runtime.restore(self)
        runtime.rebuild()
        if not runtime.sessions:
            runtime.close()
        self._runtime = None

    def add(self, controller: Controller) -> Controller:
        """Add a controller to the open session."""
        if self._runtime is None:
            raise RuntimeError("the session is not open; use it inside `with xattn.hooks(...)`")
        self.controllers.append(controller)
        self._runtime.install(self, [s.name for s in self.sites if controller.selector.matches_site(s)])
        self._runtime.rebuild()
        controller.bind(self)
        return controller

    def add_hook(self, point: str, fn: HookFn, selector: Selector | str | dict | None = None) -> Hook:
        """Add ``fn`` at a point name such as ``"probs"`` or ``"up_blocks.*.attn2.probs"``."""
        return self.add(Hook(point, fn, selector))


def hooks(model, *controllers: Controller, scheduler=None, layout: BatchLayout | None = None,
          prompts: list[str] | None = None, tokenizer=None) -> Session:
    """Open an xattn session on a diffusers pipeline or model.

    Args:
        model: a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (or
            any pipeline with a ``unet`` or ``transformer``), or the model itself.
        *controllers: what to do at the hook points (``Capture``, ``Reweight``, ``Hook``...).
        scheduler: where to read the timesteps when ``model`` is not a pipeline.
        layout: the batch layout, for calls that did not come from ``encode_prompt``.
        prompts: prompts of a bare model call, one per row (needs ``tokenizer``).

    Example::

        with xattn.hooks(pipe, xattn.Hook("probs", lambda p, ctx: print(ctx.name, ctx.step))):
            pipe("a red circle")
    """
    return Session(model, controllers, scheduler=scheduler, layout=layout, prompts=prompts, tokenizer=tokenizer)

"""Scoped sessions: install xattn processors, run controllers, restore everything.

``with xattn.hooks(pipe, *controllers) as session:`` checks every selected
site's processor (:mod:`xattn.install`), installs an
:class:`~xattn.processor.XattnProcessor` on them, and on exit puts back
exactly the processors that were there, after an exception too. Sessions
nest: an inner session adds its controllers and removes only its own.

While sessions are open on a model, one :class:`~xattn.runtime.Runtime`
per denoiser, shared by nested sessions, runs the lifecycle (see
:mod:`xattn.runtime`).
"""

from __future__ import annotations

from typing import Iterable

from . import install as installer
from .dispatch import describe_sites, plan_sites
from .errors import LayoutError, NothingSelectedError
from .hookpoints import BatchLayout, Controller, Hook, HookFn
from .processor import XattnProcessor
from .runtime import RUNTIMES, Runtime
from .selector import Selector
from .sites import Site, attention_hosts, denoiser_of, sites as list_sites


class Session:
    """An open xattn scope on one model. Use :func:`hooks` to make one."""

    def __init__(self, model, controllers: Iterable[Controller], *, scheduler=None,
                 layout: BatchLayout | None = None, prompts: list[str] | None = None, tokenizer=None):
        self.model = model
        self.denoiser = denoiser_of(model)
        self.hosts = attention_hosts(model)  # the denoiser, then any ControlNets
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
        self._runtime: Runtime | None = None

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
        return list_sites(self.model)

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
        installer.check_processors(self.hosts, names)
        runtime = RUNTIMES.get(self.denoiser)
        if runtime is None:
            runtime = RUNTIMES[self.denoiser] = Runtime(self.denoiser, self.model if self.model is not self.denoiser else None)
        for controller in self.controllers:
            if any(controller is other for other in runtime.controllers()):
                if not runtime.sessions:
                    runtime.close()
                raise NothingSelectedError(f"{controller!r} already runs in an enclosing xattn session")
        self._runtime = runtime
        runtime.sessions.append(self)
        try:
            installer.install(self.hosts, names, self._processor_for, self.originals)
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
        installer.restore(self.hosts, self.originals)
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
        installer.install(self.hosts, names, self._processor_for, self.originals)
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
            ``transformer`` and an adapter in :mod:`xattn.adapters`), or the model itself;
            or a transformers encoder–decoder model (T5, BART, Marian): then a
            :class:`xattn.seq2seq.Seq2SeqSession` (``tokenizer=`` names source words).
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
    from .seq2seq import Seq2SeqSession, is_transformers_model

    # transformers models keep no `attn_processors` registry, so the diffusion Session cannot open on them;
    # an encoder–decoder model gets its own session, hooked at transformers' attention interface (xattn.seq2seq).
    if is_transformers_model(model):
        return Seq2SeqSession(model, controllers, layout=layout, prompts=prompts, tokenizer=tokenizer)
    return Session(model, controllers, scheduler=scheduler, layout=layout, prompts=prompts, tokenizer=tokenizer)

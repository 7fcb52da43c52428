"""Encoder–decoder models (T5, BART, Marian): xattn's hook points at transformers' attention interface.

``xattn.hooks(model, *controllers)`` on a ``transformers`` encoder–decoder
model (``is_encoder_decoder``: ``T5ForConditionalGeneration``,
``BartForConditionalGeneration``, ``MarianMTModel``...) opens a
:class:`Seq2SeqSession` instead of the diffusion one. Same controllers, same
hook protocol; what the words mean:

- **Sites** are the decoder's attention modules, named by module path:
  cross-attention (T5 ``EncDecAttention``, BART / Marian ``encoder_attn``),
  kind ``cross``; the decoder's self-attention (``SelfAttention`` /
  ``self_attn``), kind ``self``. Queries are target positions, keys are source
  tokens at a cross site. The encoder's self-attention runs once per call, on
  other rows (sources, not beams), and is not a site.
- **Where xattn steps in.** transformers' attention modules call
  ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
  eager_attention_forward)``. At a selected site, the module's ``config``
  attribute is replaced, for the session only, by a view of the same config
  whose ``_attn_implementation`` names xattn's registered function; masks are
  still built by the stack from the untouched model config. That function
  calls the stock one (``sdpa`` or the model file's ``eager_attention_forward``)
  with the very same arguments when no hook runs at this call, so the output
  is bit for bit the stock one; otherwise it applies the points. If a module
  is called and its attention does not reach the interface (a transformers
  release that computes attention elsewhere), the call raises instead of
  running unhooked.
- **Points.** ``map_rows``, ``logit_bias`` and ``value_scale`` are fused: the
  stock function runs with gathered query/key rows, a float mask with the bias
  added, rows of V scaled. ``scores`` (``QKᵀ·scaling + position bias + mask +
  logit_bias``; T5 does not scale and has a position bias on self-attention
  only; BART scales by 1/√d) and ``probs`` (softmax · value_scale) make that
  call explicit. ``context`` does not apply: the decoder projects the
  encoder's states to K/V once per call and caches them, so a controller that
  uses it (``Reweight(mode="embedding")``) is refused by name.
- **The step clock.** One decoder call of ``generate()`` is one decoding step
  (one new target token; with the KV cache its query length is 1):
  ``ctx.step`` counts them from 0; ``ctx.num_steps`` is the most the call can
  take (``max_new_tokens``, else ``max_length - 1``, from the call or the
  generation config). A plain ``model(...)`` forward is a run of one step.
  ``ctx.res`` and ``ctx.latent_hw`` are ``(1, query length)``.
- **Rows** are the decoder batch: sources times beams (or
  ``num_return_sequences``), in transformers' order, ``Row(cond=True,
  prompt=source, image=beam)``. Source texts are decoded from ``input_ids``
  with ``tokenizer=`` (or given as ``prompts=``) and each row's
  :class:`~xattn.tokens.TokenMap` is checked against its ids, so words resolve
  to source token slots (``Reweight({"cat": 0.5})``).
- **Capture** keeps, at every decoding step and site, the selected heads'
  map (``per_step`` and ``keep_heads`` default to True here; passing False
  is refused, since a sum over decoding steps would add target positions up). Read it
  with :func:`maps` (per site ``[rows, heads, target, source]``) and
  :meth:`Seq2SeqMaps.alignment` (target × source of one generated sequence,
  averaged over layers and heads; beams followed through ``beam_indices``).

Only ``eager`` and ``sdpa`` stock implementations are hooked; any other (flash,
flex) at a selected site is refused, as is assisted generation (it calls the
decoder more than once per token).
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .dispatch import ActiveHooks, active_hooks, describe_sites, plan_sites
from .errors import LayoutError, NothingSelectedError, UnsupportedModelError, XattnError
from .hookpoints import BatchLayout, Controller, Hook, HookContext, HookFn, Row, Run
from .selector import Selector
from .sites import Site
from .tokens import TokenMap

ATTENTION_NAME = "xattn_seq2seq"
CROSS_NAMES = ("EncDecAttention", "encoder_attn")  # T5 / BART, Marian, mBART, Pegasus...
SELF_NAMES = ("SelfAttention", "self_attn")
STOCK_IMPLEMENTATIONS = ("eager", "sdpa")
REFUSED_GENERATE_KWARGS = ("assistant_model", "prompt_lookup_num_tokens")


class Seq2SeqError(XattnError, ValueError):
    """Something xattn cannot do on an encoder–decoder model (a point that does not apply, assisted decoding...)."""


class UnsupportedSeq2SeqModelError(UnsupportedModelError):
    """A transformers model xattn does not understand: not encoder–decoder, or no cross-attention it can find."""


class UnsupportedImplementationError(Seq2SeqError, TypeError):
    """A selected site whose attention implementation is neither ``eager`` nor ``sdpa``."""


# -- what a model is ---------------------------------------------------------------------------------------------
def is_transformers_model(model) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (transformers is never imported here for it)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def _class_name(model) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _decoder_of(model) -> tuple[str, nn.Module]:
    """(module path, decoder) of an encoder–decoder model; refused by name otherwise."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        raise UnsupportedSeq2SeqModelError(
            f"{_class_name(model)} is not an encoder–decoder model (config.is_encoder_decoder is not set); xattn "
            "hooks diffusers models and transformers encoder–decoder models (T5, BART, Marian)")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    path = next((name for name, module in model.named_modules() if module is decoder), None) if decoder else None
    if decoder is None or path is None:
        raise UnsupportedSeq2SeqModelError(f"{_class_name(model)}: xattn cannot find its decoder (get_decoder())")
    return path, decoder


def _shape(name: str, module: nn.Module, model) -> tuple[int, int]:
    heads = getattr(module, "n_heads", None) or getattr(module, "num_heads", None)
    head_dim = getattr(module, "key_value_proj_dim", None) or getattr(module, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise UnsupportedSeq2SeqModelError(f"site {name} of {_class_name(model)} holds a {_class_name(module)} whose "
                                           "heads (n_heads / num_heads) or head size (d_kv / head_dim) xattn cannot read")
    return heads, head_dim


def _modules(model) -> dict[str, tuple[nn.Module, Site]]:
    """Site name -> (attention module, Site), the decoder's attention in module order."""
    prefix, decoder = _decoder_of(model)
    found = {}
    for name, module in decoder.named_modules():
        last = name.rpartition(".")[2]
        if last not in CROSS_NAMES + SELF_NAMES or not hasattr(module, "config"):
            continue
        full = f"{prefix}.{name}"
        heads, head_dim = _shape(full, module, model)
        kind = "cross" if last in CROSS_NAMES else "self"
        found[full] = (module, Site(name=full, kind=kind, block="other", heads=heads, head_dim=head_dim))
    if not any(site.kind == "cross" for _, site in found.values()):
        raise UnsupportedSeq2SeqModelError(
            f"{_class_name(model)}: xattn finds no decoder cross-attention module (named {' or '.join(CROSS_NAMES)}) "
            "in it; it knows T5-style and BART-style encoder–decoder models")
    return found


def seq2seq_sites(model) -> list[Site]:
    """The attention sites of an encoder–decoder model: its decoder's cross (and self) attention."""
    return [site for _, site in _modules(model).values()]


# -- the attention function xattn registers ------------------------------------------------------------------------
class _ConfigView:
    """A site's ``config`` while routed: the model's own config, except the attention implementation's name."""

    def __init__(self, config, name: str):
        object.__setattr__(self, "xattn_config", config)
        object.__setattr__(self, "_attn_implementation", name)

    def __getattr__(self, key):
        return getattr(self.xattn_config, key)

    def __setattr__(self, key, value):
        setattr(self.xattn_config, key, value)


@dataclass
class _Route:
    session: "Seq2SeqSession"
    site: Site
    stock: object  # the stock attention function
    stock_name: str
    reached: bool = False


_ROUTES: "weakref.WeakKeyDictionary[nn.Module, _Route]" = weakref.WeakKeyDictionary()


def _routed_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention interface at a routed site: stock when no hook runs, else the points."""
    route = _ROUTES.get(module)
    if route is None:
        raise Seq2SeqError(f"{type(module).__name__} asks for xattn's attention outside an xattn session")
    route.reached = True
    active = route.session._active_hooks(route.site, query)
    if active is None:
        return route.stock(module, query, key, value, attention_mask, **kwargs)
    return _hooked_attention(route, active, module, query, key, value, attention_mask, kwargs)


def _causal_if_implicit(route: _Route, module, query, key, attention_mask, kwargs):
    """The mask SDPA would apply through ``is_causal`` when none is given, as a boolean tensor (True = keep).

    A bias or a gathered row needs a mask tensor; the stock sdpa path drops
    ``is_causal`` as soon as one is given, so the causal pattern (upper-left,
    as SDPA aligns it) is made explicit first. Eager never reads ``is_causal``.
    """
    if attention_mask is not None or route.stock_name != "sdpa":
        return attention_mask
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    queries, keys = query.shape[2], key.shape[2]
    if not (is_causal and queries > 1):
        return None
    keep = torch.arange(queries, device=query.device)[:, None] >= torch.arange(keys, device=query.device)[None, :]
    return keep.view(1, 1, queries, keys)


def _as_float_mask(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _hooked_attention(route: _Route, active: ActiveHooks, module, query, key, value, attention_mask, kwargs):
    batch, key_length = query.shape[0], key.shape[2]
    mask = attention_mask
    if active.has("map_rows") or active.has("logit_bias") or active.explicit:
        mask = _causal_if_implicit(route, module, query, key, mask, kwargs)
    if active.has("map_rows"):
        rows = active.run("map_rows", torch.arange(batch))
        if rows.dtype != torch.long or rows.device.type != "cpu" or ((rows < 0) | (rows >= batch)).any():
            raise ValueError(f"map_rows hooks at {route.site.name} must return row indices in 0..{batch - 1} "
                             f"(a long CPU tensor), got {rows}")
        index = rows.to(query.device)
        query, key = query[index], key[index]
        if mask is not None and mask.shape[0] == batch:
            mask = mask[index]
    if active.has("logit_bias"):
        bias = active.run("logit_bias", torch.zeros(batch, key_length, dtype=query.dtype, device=query.device))
        bias = bias[:, None, None, :]  # [b, 1, 1, j]
        mask = bias if mask is None else _as_float_mask(mask, query.dtype) + bias
    token_scale = None
    if active.has("value_scale"):
        token_scale = active.run("value_scale", torch.ones(batch, key_length, dtype=query.dtype, device=query.device))
    if not active.explicit:
        if token_scale is not None:
            value = value * token_scale[:, None, :, None]  # P·diag(c)·V = P·(diag(c)·V)
        return route.stock(module, query, key, value, mask, **kwargs)
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, i, j]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5: relative position bias (self-attention) or zeros (cross)
        scores = scores + position_bias
    if mask is not None:
        scores = scores + _as_float_mask(mask, scores.dtype)
    scores = active.run("scores", scores)
    probs = nn.functional.softmax(scores, dim=-1)
    if token_scale is not None:
        probs = probs * token_scale[:, None, None, :]
    probs = active.run("probs", probs)
    dropped = nn.functional.dropout(probs, p=kwargs.get("dropout", 0.0), training=module.training)
    output = torch.matmul(dropped, value).transpose(1, 2).contiguous()  # [b, i, h, d]
    return output, (probs if route.stock_name == "eager" else None)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _routed_attention)


def _stock_function(module: nn.Module, name: str):
    if name == "eager":  # the model file's own eager function, the default the module passes
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise UnsupportedImplementationError(f"{_class_name(module)}: its module has no eager_attention_forward")
        return function
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


# -- the session ---------------------------------------------------------------------------------------------------
_OPEN: "weakref.WeakKeyDictionary[nn.Module, Seq2SeqSession]" = weakref.WeakKeyDictionary()


class Seq2SeqSession:
    """An open xattn scope on a transformers encoder–decoder model; :func:`xattn.hooks` makes one.

    API as :class:`xattn.Session`: ``sites``, ``add``, ``add_hook``,
    ``describe``; ``model`` and ``denoiser`` are the model. On exit (an
    exception too) every site's config, the hooks on the modules and
    ``generate`` are put back as they were.
    """

    def __init__(self, model, controllers: Iterable[Controller], *, prompts: list[str] | None = None,
                 tokenizer=None, layout: BatchLayout | None = None):
        self.model = self.denoiser = model
        self.scheduler = None
        self._modules = _modules(model)  # refuses a model xattn does not understand
        self._decoder_path, self._decoder = _decoder_of(model)
        self.site_by_name = {name: site for name, (_, site) in self._modules.items()}
        self.controllers: list[Controller] = []
        for controller in controllers:
            self._check_new(controller)
            self.controllers.append(controller)
        self.tokenizer = tokenizer
        self.prompts = [prompts] if isinstance(prompts, str) else (None if prompts is None else list(prompts))
        self.layout = layout
        self.entries: dict = {}
        self._routed: dict[str, object] = {}  # site name -> the module's own config
        self._handles: list = []
        self._own_generate = None  # a `generate` the model instance itself held before the session
        self._open = False
        self._reset_call()

    # -- sites and controllers -------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return list(self.site_by_name.values())

    def _check_new(self, controller) -> None:
        if not isinstance(controller, Controller):
            raise TypeError(f"{controller!r} is not an xattn controller; wrap a function as "
                            "xattn.Hook('probs', fn, selector) or subclass xattn.Controller")
        if any(controller is other for other in self.controllers):
            raise NothingSelectedError(f"{controller!r} is given twice; it would run twice at every call")
        controller.check_selector()
        names = self._sites_of(controller)
        if "context" in controller.points() and any(self.site_by_name[n].kind == "cross" for n in names):
            raise Seq2SeqError(
                f"{controller!r} uses the `context` point, which does not apply to an encoder–decoder model: its "
                "decoder projects the encoder's states to keys and values once per call and caches them. Use "
                "value_scale / logit_bias / probs (Reweight's modes scale and bias)")

    def _sites_of(self, controller: Controller) -> list[str]:
        names = [site.name for site in self.sites if controller.selector.matches_site(site)]
        if not names:
            raise NothingSelectedError(f"the selector '{controller.selector}' of {controller!r} matches no attention "
                                       f"site of {type(self.model).__name__}; list them with xattn.sites(model)")
        return names

    def _selected(self) -> list[str]:
        if not self.controllers:
            return list(self.site_by_name)
        names: list[str] = []
        for controller in self.controllers:
            names += [name for name in self._sites_of(controller) if name not in names]
        return names

    # -- open / close ----------------------------------------------------------
    def __enter__(self) -> "Seq2SeqSession":
        if self.model in _OPEN:
            raise Seq2SeqError(f"an xattn session is already open on this {type(self.model).__name__}; add "
                               "controllers to it with session.add(...) instead of nesting sessions")
        names = self._selected()
        self._check_implementations(names)  # raises before anything changes
        _register()
        _OPEN[self.model] = self
        self._open = True
        try:
            self._route(names)
            self._watch()
            self._rebuild()
            for controller in self.controllers:
                self._bind(controller)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._open:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, config in self._routed.items():
            module = self._modules[name][0]
            module.config = config
            _ROUTES.pop(module, None)
        self._routed = {}
        self.model.__dict__.pop("generate", None)
        if self._own_generate is not None:
            self.model.__dict__["generate"] = self._own_generate
        _OPEN.pop(self.model, None)
        self._open = False
        self._reset_call()

    def _check_implementations(self, names: list[str]) -> None:
        for name in names:
            module = self._modules[name][0]
            implementation = getattr(module.config, "_attn_implementation", None) or "eager"
            if implementation not in STOCK_IMPLEMENTATIONS:
                raise UnsupportedImplementationError(
                    f"site {name} of {type(self.model).__name__} uses the {implementation!r} attention "
                    f"implementation; xattn hooks {' and '.join(STOCK_IMPLEMENTATIONS)} only: "
                    "model.set_attn_implementation('sdpa'), or deselect the site")
            if getattr(module, "num_key_value_groups", 1) != 1:
                raise UnsupportedImplementationError(f"site {name}: grouped key/value heads are not supported")

    def _route(self, names: list[str]) -> None:
        for name in names:
            if name in self._routed:
                continue
            module, site = self._modules[name]
            config = module.config
            implementation = getattr(config, "_attn_implementation", None) or "eager"
            _ROUTES[module] = _Route(self, site, _stock_function(module, implementation), implementation)
            self._routed[name] = config
            module.config = _ConfigView(config, ATTENTION_NAME)
            self._handles += [module.register_forward_pre_hook(self._site_called),
                              module.register_forward_hook(self._site_returned)]

    def _watch(self) -> None:
        """The run lifecycle: ``generate`` (a run), the model's forward outside it (a run), decoder calls (steps)."""
        model = self.model
        self._own_generate = model.__dict__.get("generate")
        original = model.generate
        session = self

        def generate(*args, **kwargs):
            refused = [name for name in REFUSED_GENERATE_KWARGS if kwargs.get(name) is not None]
            if refused:
                raise Seq2SeqError(f"generate({refused[0]}=...) calls the decoder more than once per new token, so "
                                   "xattn's step clock would not count decoding steps; drop it inside the session")
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            session._start_call(ids if isinstance(ids, torch.Tensor) else None, kwargs.get("attention_mask"),
                                session._max_steps(kwargs))
            session._in_generate = True
            try:
                result = original(*args, **kwargs)
                session._end_run()
                return result
            finally:
                session._in_generate = False
                session._reset_call()

        generate.__wrapped__ = original
        model.__dict__["generate"] = generate
        self._signature = inspect.signature(model.forward)
        self._handles += [model.register_forward_pre_hook(self._model_called, with_kwargs=True),
                          model.register_forward_hook(self._model_returned),
                          self._decoder.register_forward_pre_hook(self._decoder_called)]

    def _max_steps(self, kwargs: dict) -> int | None:
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if new is not None:
            return int(new)
        longest = kwargs.get("max_length", getattr(config, "max_length", None))
        return None if longest is None else max(int(longest) - 1, 1)

    def _bind(self, controller: Controller) -> None:
        from .capture import Capture

        if isinstance(controller, Capture):  # one map per decoding step (= target position) and head
            refused = [name for name, value in controller.asked.items() if value is False]
            if refused:
                raise Seq2SeqError(f"an encoder-decoder alignment needs one map per decoding step and head; "
                                   f"{', '.join(f'{name}=False' for name in refused)} would sum target positions "
                                   "(or heads) together: leave them unset or pass True")
            controller.per_step = controller.keep_heads = True
        controller.bind(self)

    def _rebuild(self) -> None:
        self.entries = plan_sites(self.controllers, self.sites)

    def add(self, controller: Controller) -> Controller:
        """Add a controller to the open session."""
        if not self._open:
            raise RuntimeError("the session is not open; use it inside `with xattn.hooks(...)`")
        self._check_new(controller)
        names = self._sites_of(controller)
        self._check_implementations(names)
        self._route(names)
        self.controllers.append(controller)
        self._rebuild()
        self._bind(controller)
        return controller

    def add_hook(self, point: str, fn: HookFn, selector: Selector | str | dict | None = None) -> Hook:
        return self.add(Hook(point, fn, selector))

    def describe(self) -> str:
        return describe_sites(self.entries or plan_sites(self.controllers, self.sites), self.sites)

    # -- the run and its steps -------------------------------------------------
    def _reset_call(self) -> None:
        self._in_generate = getattr(self, "_in_generate", False)
        self._sources: tuple | None = None
        self._num_steps: int | None = None
        self._call_open = False
        self.run: Run | None = None
        self.step: int | None = None
        self._ran: set[int] = set()
        self._layouts: dict[int, BatchLayout] = {}

    def _start_call(self, ids, mask, num_steps: int | None) -> None:
        self._reset_call()
        self._sources = (ids, mask)
        self._num_steps = num_steps
        self._call_open = True

    def _model_called(self, module, args, kwargs):
        if self._in_generate:
            return None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        ids = bound.get("input_ids")
        self._start_call(ids if isinstance(ids, torch.Tensor) else None, bound.get("attention_mask"), 1)
        return None

    def _model_returned(self, module, args, output):
        if not self._in_generate:
            self._end_run()
            self._reset_call()

    def _decoder_called(self, module, args):
        if not self._call_open:  # the decoder called on its own: a run of its own
            self._start_call(None, None, 1)
        self.step = 0 if self.step is None else self.step + 1

    def _site_called(self, module, args):
        _ROUTES[module].reached = False

    def _site_returned(self, module, args, output):
        route = _ROUTES.get(module)
        if route is not None and not route.reached:
            raise Seq2SeqError(f"site {route.site.name} ran without calling transformers' attention interface, so "
                               "xattn could not hook it; this transformers version computes its attention elsewhere")

    def _begin_run(self, rows: int) -> None:
        layout = self._layout(rows)
        self.run = Run(layout, self._num_steps, (1, 1))
        self._ran = set()
        for controller in self.controllers:
            controller.begin_run(self.run)

    def _end_run(self) -> None:
        if self.run is None:
            return
        for controller in [c for c in self.controllers if id(c) not in self._ran]:
            warnings.warn(f"{controller!r} ran at no attention call of this run: its selector "
                          f"'{controller.selector}' matched no site at these steps", stacklevel=3)
        self.run = None

    @torch.compiler.disable
    def _active_hooks(self, site: Site, query: torch.Tensor) -> ActiveHooks | None:
        entries = self.entries.get(site.name)
        if not entries:
            return None
        if self.run is None:
            self._begin_run(query.shape[0])
        layout = self.run.layout
        if layout.batch_size != query.shape[0]:
            raise LayoutError(f"the decoder batch changed from {layout.batch_size} to {query.shape[0]} rows within "
                              "one run; xattn counts one decoder call per decoding step")
        queries = int(query.shape[2])
        context = HookContext(site, "", (1, queries), self.step, self._num_steps, None, layout, (1, queries))
        for controller, _, _ in entries:
            if controller.selector.matches_step(self.step, self._num_steps):
                self._ran.add(id(controller))
        return active_hooks(entries, context)

    # -- rows and source words --------------------------------------------------
    def _layout(self, rows: int) -> BatchLayout:
        if self.layout is not None:
            if self.layout.batch_size != rows:
                raise LayoutError(f"the given layout has {self.layout.batch_size} rows, the decoder batch {rows}")
            return self.layout
        ids, mask = self._sources or (None, None)
        prompts = self.prompts
        if prompts is None and ids is not None and self.tokenizer is not None:
            prompts = [self.tokenizer.decode(_kept(ids[r], mask, r), skip_special_tokens=True)
                       for r in range(ids.shape[0])]
        sources = len(prompts) if prompts is not None else (ids.shape[0] if ids is not None else rows)
        if sources < 1 or rows % sources:
            raise LayoutError(f"the decoder batch has {rows} rows, not a multiple of the {sources} source(s)")
        copies = rows // sources  # beams, or num_return_sequences, per source (transformers repeats interleaved)
        layout_rows = tuple(Row(True, r // copies, r % copies) for r in range(rows))
        if prompts is None or self.tokenizer is None:
            if prompts is not None:
                raise LayoutError("`prompts=` needs a tokenizer to find source words: pass `tokenizer=`")
            return BatchLayout(rows=layout_rows)
        length = ids.shape[1] if ids is not None else None
        token_maps = []
        for index, prompt in enumerate(prompts):
            token_map = TokenMap(self.tokenizer, prompt, max_length=length)
            if ids is not None:
                expected = self.tokenizer(prompt)["input_ids"]
                given = _kept(ids[index], mask, index)
                if given != expected:
                    raise LayoutError(
                        f"source {index}: the tokenizer gives {expected} for {prompt!r}, but generate() got {given}; "
                        "pass the tokenizer that made input_ids (right padding), or the texts as prompts=")
            token_maps.append(token_map)
        return BatchLayout(rows=layout_rows, prompts=tuple(prompts), token_maps=tuple(token_maps))


def _kept(ids: torch.Tensor, mask, row: int) -> list[int]:
    """A source row's ids without its padding (by the attention mask, when given)."""
    values = ids.tolist()
    if mask is not None:
        keep = mask[row].tolist()
        values = [v for v, k in zip(values, keep) if k]
    return values


# -- reading a capture ---------------------------------------------------------------------------------------------
class Seq2SeqMaps:
    """A capture of an encoder–decoder run, as target × source maps.

    ``per_site[name]`` is ``[rows, heads, target, columns]``: row = decoder row
    (source × beam), heads = the captured heads, target = decoding step (the
    newest query of each step's call), columns = the source slots kept
    (``columns``; without ``tokens=`` in the selector, slot 0 up to the longest
    source's end token). Padding columns hold 0 (masked).
    """

    def __init__(self, per_site: dict[str, torch.Tensor], columns: list[int], heads: dict[str, tuple[int, ...]],
                 rows: tuple[Row, ...], token_maps: list[TokenMap | None], steps: list[int]):
        self.per_site = per_site
        self.columns = columns
        self.heads = heads
        self.rows = rows
        self.token_maps = token_maps
        self.steps = steps

    def source_tokens(self, row: int = 0) -> list[str]:
        """The source tokens of ``row``'s source, in slot order (pieces, then ``<end>``)."""
        token_map = self.token_maps[self.rows[row].prompt] if self.token_maps else None
        if token_map is None:
            raise LayoutError("the sources are unknown: pass `tokenizer=` to xattn.hooks(...)")
        return ["<start>"] * token_map.start_slots + list(token_map.pieces) + ["<end>"]

    def alignment(self, row: int = 0, *, sites: list[str] | None = None, heads: list[int] | None = None,
                  beam_indices: torch.Tensor | None = None, kind: str = "cross") -> torch.Tensor:
        """Target × source attention of one generated sequence, averaged over layers (sites) and heads.

        Args:
            row: the decoder row (greedy / sampling: the sequence's index in the output).
            sites: the sites to average (default: every captured site of ``kind``).
            heads: head indices to average (default: every captured head).
            beam_indices: for beam search, ``output.beam_indices[k]`` of the sequence
                (``generate(..., return_dict_in_generate=True, output_scores=True)``):
                step s reads the row that beam was at (-1 entries end the sequence).

        Returns ``[target, source]``: one row per decoding step, one column per
        source token of the row's source (its padding cut off when the source is
        known; all kept columns otherwise).
        """
        names = sites or [name for name in self.per_site if kind == "all" or _kind_of_name(name) == kind]
        if not names:
            raise LayoutError(f"no captured site of kind {kind!r}")
        stacked = torch.stack([self._pick_heads(name, heads) for name in names])  # [sites, rows, T, J]
        mean = stacked.mean(dim=0)  # [rows, T, J]
        if beam_indices is None:
            matrix = mean[row]
        else:
            picked = [int(b) for b in beam_indices.tolist()[: mean.shape[1]] if int(b) >= 0]
            matrix = torch.stack([mean[b, step] for step, b in enumerate(picked)])
            row = picked[0] if picked else row
        token_map = self.token_maps[self.rows[row].prompt] if self.token_maps else None
        if token_map is not None and self.columns == list(range(len(self.columns))):
            matrix = matrix[:, : min(token_map.length, matrix.shape[1])]
        return matrix

    def _pick_heads(self, name: str, heads: list[int] | None) -> torch.Tensor:
        data = self.per_site[name]  # [rows, h, T, J]
        if heads is not None:
            kept = self.heads[name]
            data = data[:, [kept.index(h) for h in heads]]
        return data.mean(dim=1)


def _kind_of_name(name: str) -> str:
    return "cross" if name.rpartition(".")[2] in CROSS_NAMES else "self"


def maps(capture) -> Seq2SeqMaps:
    """The target × source maps of a :class:`xattn.Capture` run on an encoder–decoder model."""
    word_maps = capture.maps()
    by_site: dict[str, list] = {}
    heads: dict[str, tuple[int, ...]] = {}
    for layer in word_maps.layers:
        if not layer.steps or layer.heads is None:
            raise Seq2SeqError("this capture was not made in an encoder–decoder session (it holds no per-step, "
                               "per-head maps); open xattn.hooks(model, capture) on the model")
        data = layer.tensor() / max(layer.count, 1)  # [rows, h, i, j(+1)]
        if word_maps.others:
            data = data[..., :-1]  # the summed padding column
        by_site.setdefault(layer.sites[0], []).append((layer.steps[0], data[:, :, -1]))  # the newest query
        heads[layer.sites[0]] = layer.heads
    per_site, steps = {}, []
    for name, items in by_site.items():
        items.sort(key=lambda item: item[0])
        steps = [step for step, _ in items]
        widths = {item.shape[-1] for _, item in items}
        if len(widths) > 1:  # self-attention: keys grow with the target; pad to the longest
            longest = max(widths)
            items = [(s, nn.functional.pad(item, (0, longest - item.shape[-1]))) for s, item in items]
        per_site[name] = torch.stack([item for _, item in items], dim=2)  # [rows, h, T, j]
    columns = list(word_maps.columns) if word_maps.columns is not None else list(range(
        next(iter(per_site.values())).shape[-1] if per_site else 0))
    return Seq2SeqMaps(per_site, columns, heads, word_maps.rows, word_maps.token_maps, steps)


__all__ = ["ATTENTION_NAME", "Seq2SeqError", "Seq2SeqMaps", "Seq2SeqSession", "UnsupportedImplementationError",
           "UnsupportedSeq2SeqModelError", "is_transformers_model", "maps", "seq2seq_sites"]

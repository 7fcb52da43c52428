"""Hook points, the context every hook receives, and the controller protocol.

Every attention call passes through six named hook points, in this order::

    context      [b, j, d_ctx]   text embeddings entering to_k / to_v (cross and joint sites)
    map_rows     [b] long (CPU)  whose attention map each row uses (starts as 0..b-1)  (fused)
    logit_bias   [b, j]          additive pre-softmax bias per row and token   (fused)
    value_scale  [b, j]          post-softmax multiplier per row and token    (fused)
    scores       [b, h, i, j]    logits QK^T * scale (+ mask + logit_bias)     (explicit)
    probs        [b, h, i, j]    softmax(scores) * value_scale                 (explicit)

Legend: b batch rows, h heads, i query positions (h_res * w_res), j key
positions (77 text slots at cross sites), d feature.

One hook signature for all of them: ``fn(x, ctx) -> Tensor | None``; ``None``
means "observe only". ``logit_bias`` starts as zeros and ``value_scale`` as
ones, so a hook returns its contribution folded in (``x + bias``, ``x * w``);
``map_rows`` starts as ``arange(b)``, and a hook that sets ``x[r] = s`` makes
row r attend with row s's map (prompt-to-prompt's injection). The fused
points never materialise the map: the processor turns them into SDPA's
float mask, a scale on the rows of V, and a gather of Q and K rows. Only ``scores`` and ``probs``
force the explicit path, and only at the sites and steps where they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .errors import XattnError
from .selector import Selector, SelectorError
from .sites import Site
from .tokens import TokenMap

POINTS = ("context", "map_rows", "logit_bias", "value_scale", "scores", "probs")
EXPLICIT_POINTS = ("scores", "probs")

HookFn = Callable[[torch.Tensor, "HookContext"], Optional[torch.Tensor]]


class PromptsUnknownError(XattnError, LookupError):
    """Words were asked of a call whose prompts xattn was not told."""


@dataclass(frozen=True)
class Row:
    """What one row of the UNet batch is."""

    cond: bool  # True: conditioned on the prompt; False: classifier-free guidance's unconditional row
    prompt: int  # index of the prompt in the pipeline call
    image: int  # index of the image among that prompt's num_images_per_prompt


@dataclass(frozen=True)
class BatchLayout:
    """The rows of a UNet call, computed once per distinct text batch.

    Rows are identified by matching each row's text embedding against the
    embeddings the pipeline encoded, never by assuming which half is which.
    """

    rows: tuple[Row, ...]
    prompts: tuple[str | None, ...] = ()
    token_maps: tuple[TokenMap | None, ...] = ()
    negative_prompts: tuple[str | None, ...] = ()

    @classmethod
    def plain(cls, batch_size: int) -> "BatchLayout":
        """Layout of a bare model call: every row its own conditional prompt."""
        return cls(rows=tuple(Row(True, r, 0) for r in range(batch_size)))

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def num_prompts(self) -> int:
        return 1 + max((row.prompt for row in self.rows), default=-1)

    @property
    def images_per_prompt(self) -> int:
        return 1 + max((row.image for row in self.rows), default=-1)

    def row_indices(self, *, cond: bool | None = True, prompt: int | None = None, image: int | None = None) -> list[int]:
        """Indices of the rows matching the given fields (``None`` = any)."""
        return [
            index
            for index, row in enumerate(self.rows)
            if (cond is None or row.cond == cond)
            and (prompt is None or row.prompt == prompt)
            and (image is None or row.image == image)
        ]

    def cond_rows(self) -> list[int]:
        return self.row_indices(cond=True)

    def uncond_rows(self) -> list[int]:
        return self.row_indices(cond=False)

    def token_map(self, prompt: int) -> TokenMap:
        """The token map of prompt ``prompt``; a clear error when prompts are unknown."""
        if prompt >= len(self.token_maps) or self.token_maps[prompt] is None:
            raise PromptsUnknownError(
                "the prompts of this call are unknown (the model was called directly, or with "
                "prompt_embeds): pass `prompts=` to xattn.hooks(...) to resolve words"
            )
        return self.token_maps[prompt]


@dataclass(frozen=True)
class HookContext:
    """Everything a hook may want to know about the attention call it observes."""

    site: Site
    point: str
    res: tuple[int, int]  # (h, w) of the query map at this site, derived from the latent shape
    step: int | None  # index into the schedule's distinct timesteps, 0..num_steps-1
    num_steps: int | None
    timestep: float | None
    layout: BatchLayout
    latent_hw: tuple[int, int] | None = None  # (H, W) of the denoiser's input latent; ``res`` is derived from it
    heads: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", self.site.heads)

    @property
    def name(self) -> str:
        """Full hook point name, e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2.probs``."""
        return f"{self.site.name}.{self.point}"

    @property
    def kind(self) -> str:
        return self.site.kind

    @property
    def progress(self) -> float | None:
        """Fraction of the schedule done before this step (0 at the first step)."""
        if self.step is None or not self.num_steps:
            return None
        return self.step / self.num_steps


@dataclass(frozen=True)
class Run:
    """One pipeline call, as every controller learns it in :meth:`Controller.begin_run`.

    Known at the first denoiser call of the run: how the batch is laid out,
    how many steps the schedule has, and the latent's size.
    """

    layout: BatchLayout
    num_steps: int | None  # None: no scheduler to read (a bare model call)
    latent_hw: tuple[int, int]  # (H, W) of the latent the denoiser sees

    @property
    def prompts(self) -> tuple[str | None, ...]:
        return self.layout.prompts

    @property
    def negative_prompts(self) -> tuple[str | None, ...]:
        return self.layout.negative_prompts


class Controller:
    """Base of every controller: a selector plus hook methods named after points.

    The lifecycle, driven by the session (see ``docs/architecture.md``):

    - ``bind(session)`` once, when a session opens with the controller;
    - ``begin_run(run)`` once per pipeline call, before its first hook runs:
      resolve words, windows and rows here, and drop the last run's state;
    - the hook methods (``probs(x, ctx)``...) at every selected attention call
      where ``active(ctx)`` holds; ``active`` is a pure predicate;
    - ``before_step(steer)`` before each step's denoiser call, when the
      controller defines it (guidance): it may return steered latents;
    - ``on_step_end(step, latents)`` after each denoising step, when the
      controller defines it; it may return new latents.

    A subclass defines only the points it uses, e.g. ``def probs(self, x, ctx)``.
    ``slices`` names the selector keys beyond where/when (``heads``,
    ``tokens``) that the controller honours; the session refuses any other.
    A steering pass (another controller's ``before_step``) runs that controller's
    hooks only, unless ``conditions`` says this one changes what the step's call is
    conditioned on (a prompt schedule): then its hooks run there too.
    """

    selector: Selector = Selector()
    slices: frozenset[str] = frozenset()
    conditions: bool = False  # True: it changes the conditioning, so guidance passes must see it as well

    def points(self) -> dict[str, HookFn]:
        """The hook points this controller uses, by name."""
        return {point: getattr(self, point) for point in POINTS if callable(getattr(self, point, None))}

    def active(self, ctx: HookContext) -> bool:
        """Whether the hooks run in this call (beyond the selector). Must not change state."""
        return True

    def bind(self, session) -> None:
        """Called when a session opens with this controller (or adds it).

        Lets a controller see the model before any call (``session.model``,
        ``session.denoiser``, ``session.sites``), e.g. to check a memory
        budget before sampling starts. The default does nothing.
        """

    def begin_run(self, run: Run) -> None:
        """A pipeline call starts: forget the last run, resolve what depends on this one."""
        self.reset()

    def reset(self) -> None:
        """Kept for controllers written before ``begin_run``: the default ``begin_run`` calls it."""

    def on_step_end(self, step: int, latents: torch.Tensor) -> torch.Tensor | None:
        """After step ``step`` of the run: return new latents, or None to keep them."""
        return None

    def wants_step_end(self) -> bool:
        """True when this controller overrides :meth:`on_step_end`."""
        return type(self).on_step_end is not Controller.on_step_end

    def before_step(self, steer) -> torch.Tensor | None:
        """Before step ``steer.step``'s denoiser call: return steered latents, or None (see :mod:`xattn.steering`)."""
        return None

    def wants_before_step(self) -> bool:
        """True when this controller overrides :meth:`before_step`."""
        return type(self).before_step is not Controller.before_step

    def check_selector(self) -> None:
        """Refuse slicing keys (``heads=``, ``tokens=``) this controller would ignore."""
        unhonoured = [key for key in self.selector.slicing_keys() if key not in self.slices]
        if unhonoured:
            keys = ", ".join(f"{key}=" for key in unhonoured)
            honoured = ", ".join(sorted(self.slices)) or "none"
            raise SelectorError(f"{self!r} does not honour {keys} in its selector (it honours: {honoured}); "
                                f"remove it, or use a controller that slices maps, such as xattn.Capture(heads=...)")


class HookError(XattnError, ValueError):
    """A hook that cannot run as written: unknown point, not callable, a wrong shape returned."""


class Hook(Controller):
    """A single function at a named point, TransformerLens style.

    Args:
        point: one of :data:`POINTS`, or a full name ``"<site glob>.<point>"``
            such as ``"up_blocks.*.attn2.probs"``.
        fn: ``fn(x, ctx) -> Tensor | None``.
        selector: further restricts where it runs (string, dict or Selector).
    """

    def __init__(self, point: str, fn: HookFn, selector: Selector | str | dict | None = None):
        if not callable(fn):
            raise HookError(f"hook {point!r}: {fn!r} is not callable; pass fn(x, ctx) -> Tensor | None")
        site_glob, point_name = split_point_name(point)
        self.selector = Selector.coerce(selector)
        if site_glob is not None:
            if self.selector.sites is not None:
                raise HookError(f"hook {point!r} names its sites; do not also give `sites` in the selector")
            self.selector = replace(self.selector, sites=(site_glob,))
        self.point = point_name
        self.fn = fn

    def points(self) -> dict[str, HookFn]:
        return {self.point: self.fn}

    def __repr__(self) -> str:
        return f"Hook({self.point!r}, {getattr(self.fn, '__name__', self.fn)!r}, selector='{self.selector}')"


def split_point_name(name: str) -> tuple[str | None, str]:
    """``"up_blocks.*.attn2.probs"`` -> ``("up_blocks.*.attn2", "probs")``; ``"probs"`` -> ``(None, "probs")``."""
    site_glob, _, point = name.rpartition(".")
    if point not in POINTS:
        raise HookError(f"hook point {name!r} does not end in one of {', '.join(POINTS)}")
    return (site_glob or None), point

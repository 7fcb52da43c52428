"""Prompt-to-prompt controllers: give the target prompts the source prompt's attention.

Hertz et al. 2022 (prompt-to-prompt) keep an image's layout while changing
its words by sampling the source and target prompts together from the same
latent and, during the first part of sampling, replacing the target's
attention with the source's:

- :class:`Replace` (word swap) and :class:`Refine` (added or changed words)
  replace *cross*-attention through a :class:`~xattn.edit.align.Mapper`:
  ``P_tgt <- P_src @ M`` on the target slots that take the source's attention,
  at the steps of their window (one window, or one per word).
- :class:`SelfInject` gives the target rows the source row's *self*-attention
  map at the chosen resolutions (``res<=32`` by default) and steps, through
  the fused ``map_rows`` point: no self-attention map is ever materialised.

The cross-attention edits run at the ``probs`` point, so only the cross sites
and steps they select compute the explicit map (``[b, h, i, 77]``, small), and
they write the target rows in place
(no copy of the map; a hook that runs earlier and keeps a map must clone it). Word -> slot lookups and windows are
resolved once per run (``begin_run``), never per layer.
Rows: see :mod:`xattn.edit.pairs`.

Chaining with :class:`xattn.Reweight` (prompt-to-prompt's equalizer): a
``scale``-mode Reweight of the target rows multiplies the *replaced* map, as
in prompt-to-prompt, provided it comes before the edit in ``xattn.hooks(...)``
(the edit reads the final token scale at the ``value_scale`` point).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from ..hookpoints import BatchLayout, Controller, HookContext, Run
from ..selector import Selector, SelectorError
from ..tokens import TokenError, TokenMap
from .align import Mapper, build_mapper, check_chunks
from .errors import EditError
from .pairs import RowPairs, check_rows, row_pairs
from .windows import CROSS_STEPS, DEFAULT_KEY, SELF_STEPS, WindowSpec, describe, parse_window, parse_word_windows, steps_in


SELF_RES = "<=32"  # self-attention maps injected at sizes up to 32: prompt-to-prompt's choice for SD
# edit()'s default: SELF_RES on a UNet; every site on a transformer, whose sites all see one patch grid that
# grows with the image (a 1024^2 Flux, SD3 or PixArt image has a 64 x 64 grid: "<=32" would inject nowhere)
SELF_RES_AUTO = "auto"


def _own_selector(selector, kind: str, name: str) -> Selector:
    try:
        selector = Selector.coerce(selector)
    except SelectorError as error:
        raise EditError(f"{name}: {error}") from None
    if selector.kind not in (None, kind):
        raise EditError(f"{name} acts on {kind}-attention; its selector asks kind={selector.kind}")
    if selector.steps is not None:
        raise EditError(f"{name}: give the step window as `steps=`, not in the selector")
    if selector.tokens is not None:
        raise EditError(f"{name}: the words come from the prompts; the selector cannot name tokens")
    return replace(selector, kind=kind)


def token_maps_of(layout: BatchLayout) -> list[TokenMap]:
    """The token map of every prompt of the call, with a clear error when prompts are unknown."""
    try:
        return [layout.token_map(p) for p in range(layout.num_prompts)]
    except LookupError as error:
        raise EditError(f"an edit needs to know the prompts of the batch: {error}") from None


@dataclass(frozen=True)
class _CrossPlan:
    """Everything the cross-attention replacement needs in a run, built once."""

    pairs: RowPairs
    matrix: torch.Tensor  # [n, j_src, j_tgt] float64, the mapper of each pair's target prompt
    weight: torch.Tensor  # [num_steps, n, j_tgt] float64: alpha times "this slot's window covers this step"
    steps: frozenset[int]  # steps where any slot is replaced


class CrossAttentionEdit(Controller):
    """Base of :class:`Replace` and :class:`Refine`: ``P_tgt <- P_src @ M`` where the window says.

    Args:
        steps: the window of steps where target slots take the source's
            attention: ``"0:0.8"`` (fractions), ``"0:20"`` (indices), ``0.8``
            (short for ``0:0.8``), or a dict per word of the target prompts,
            ``{"default": 0.8, "circle": "0:0.4"}`` (prompt-to-prompt's
            ``cross_replace_steps``).
        selector: which cross-attention sites (``"res=16"``, ``"sites=up_blocks.*"``);
            all by default, as in prompt-to-prompt.
        rows: ``"cond"`` (default) or ``"all"``; see :mod:`xattn.edit.pairs`.
    """

    mode = "auto"  # which mapper: "replace", "refine" or "auto" (by word counts)

    def __init__(self, steps: WindowSpec | Mapping[str, WindowSpec] = CROSS_STEPS, *,
                 selector: Selector | str | dict | None = None, rows: str = "cond"):
        self.windows = parse_word_windows(steps, what=f"{type(self).__name__} steps")
        self.selector = _own_selector(selector, "cross", type(self).__name__)
        self.rows = check_rows(rows)
        self._mappers: dict[tuple[str, str], Mapper] = {}  # kept across runs: they depend on the prompts only
        self.reset()

    # -- protocol ----------------------------------------------------------------
    def points(self):
        return {"value_scale": self._observe_scale, "probs": self._replace}

    def begin_run(self, run: Run) -> None:
        """Rows, mappers and per-step slot weights, once per run."""
        self.reset()
        self._plan = self.plan(run.layout, run.num_steps)

    def reset(self) -> None:
        self._plan: _CrossPlan | None = None
        self._scale: torch.Tensor | None = None
        self._cast: dict = {}

    def bind(self, session) -> None:
        later = session.controllers[session.controllers.index(self) + 1:]
        for other in later:
            if "value_scale" in other.points():
                raise EditError(f"{other!r} comes after {type(self).__name__} in xattn.hooks(...); put token "
                                "weights (Reweight) before the edit so the edit can apply them to the replaced maps")

    def active(self, ctx: HookContext) -> bool:
        return self._plan is not None and ctx.step in self._plan.steps

    # -- per run -----------------------------------------------------------------
    def mappers(self, token_maps: list[TokenMap]) -> list[Mapper]:
        """The mapper of each target prompt (``token_maps[1:]``) from the source (``token_maps[0]``).

        Long prompts (77-slot chunks) are mapped over the batch's length: every
        prompt padded with empty chunks to the longest (:func:`~xattn.edit.align.check_chunks`).
        """
        source = token_maps[0]
        length = check_chunks(token_maps) if source.chunks is not None else None
        out = []
        for target in token_maps[1:]:
            key = (source.prompt, target.prompt, length)
            if key not in self._mappers:
                self._mappers[key] = build_mapper(self.mode, source, target, length)
            out.append(self._mappers[key])
        return out

    def slot_windows(self, token_maps: list[TokenMap]) -> list[list[tuple]]:
        """For each target prompt, the window of every slot (a named word's, else the default)."""
        named = {word: window for word, window in self.windows.items() if word != DEFAULT_KEY}
        found = {word: False for word in named}
        per_target = []
        length = max(token_map.max_length for token_map in token_maps)  # long prompts: padded to the longest
        for target in token_maps[1:]:
            windows = [self.windows[DEFAULT_KEY]] * length
            for word, window in named.items():
                try:
                    slots = target.indices(word)
                except TokenError:
                    continue
                found[word] = True
                for slot in slots:
                    windows[slot] = window
            per_target.append(windows)
        missing = [word for word, was_found in found.items() if not was_found]
        if missing:
            prompts = ", ".join(repr(t.prompt) for t in token_maps[1:])
            raise EditError(f"{type(self).__name__} steps name {', '.join(map(repr, missing))}, which is in no "
                            f"target prompt ({prompts})")
        return per_target

    def plan(self, layout: BatchLayout, num_steps: int | None) -> _CrossPlan:
        """Rows, mappers and per-step slot weights for a run with this layout and step count."""
        token_maps = token_maps_of(layout)
        pairs = row_pairs(layout, self.rows)
        mappers = self.mappers(token_maps)
        windows = self.slot_windows(token_maps)
        name = f"{type(self).__name__} steps"
        step_sets = {describe(w): steps_in(w, num_steps, name) for ws in windows for w in ws}
        horizon = num_steps if num_steps is not None else 1 + max((max(s) for s in step_sets.values() if s), default=0)
        length = mappers[0].matrix.shape[0] if mappers else token_maps[0].max_length
        weight = torch.zeros(horizon, len(pairs), length, dtype=torch.float64)  # [steps, n, j]
        for n, prompt in enumerate(pairs.prompt):
            mapper, slot_window = mappers[prompt - 1], windows[prompt - 1]
            for slot in range(length):
                for s in step_sets[describe(slot_window[slot])]:
                    weight[s, n, slot] = mapper.alpha[slot]
        if len(pairs):
            matrix = torch.stack([mappers[p - 1].matrix for p in pairs.prompt])  # [n, j, j]
        else:
            matrix = torch.zeros(0, length, length, dtype=torch.float64)
        active_steps = frozenset(int(s) for s in torch.nonzero(weight.sum(dim=(1, 2))).flatten().tolist())
        return _CrossPlan(pairs, matrix, weight, active_steps)

    # -- per call ------------------------------------------------------------------
    def _observe_scale(self, x: torch.Tensor, ctx: HookContext) -> None:
        self._scale = x  # [b, j], the product of the token weights of every earlier controller
        return None

    def _replace(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        plan = self._plan
        if x.shape[-1] < plan.matrix.shape[-1]:
            raise EditError(f"{ctx.name} attends to {x.shape[-1]} text slots but the prompts' token maps have "
                            f"{plan.matrix.shape[-1]}; edits need one token sequence per prompt")
        source, target, matrix, weight = self._tensors(plan, ctx.step, x)
        mapped = torch.matmul(x[source], matrix)  # [n, h, i, j_src] @ [n, 1, j_src, j_tgt] -> [n, h, i, j_tgt]
        if self._scale is not None:
            mapped = mapped * self._scale[target][:, None, None, :]  # the target rows' token weights
        x[target] = mapped * weight + x[target] * (1 - weight)  # in place: no copy of the whole map
        return x

    def _tensors(self, plan: _CrossPlan, step: int, x: torch.Tensor):
        """Row indices, mappers and this step's slot weights on ``x``'s device and dtype, once per step."""
        key = (step, x.dtype, x.device)
        if key not in self._cast:
            source = plan.pairs.source.to(x.device)
            target = plan.pairs.target.to(x.device)
            matrix, weight = _widened(plan.matrix, plan.weight[step], x.shape[-1])
            matrix = matrix.to(dtype=x.dtype, device=x.device)[:, None]  # [n, 1, j, j]
            weight = weight.to(dtype=x.dtype, device=x.device)[:, None, None, :]  # [n, 1, 1, j]
            self._cast[key] = (source, target, matrix, weight)
        return self._cast[key]

    def to_dict(self) -> dict:
        """What this controller does, for manifests."""
        return {"edit": type(self).__name__.lower(), "mode": self.mode, "rows": self.rows,
                "selector": str(self.selector),
                "steps": {word: describe(window) for word, window in self.windows.items()}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.to_dict()['steps']!r})"


def _widened(matrix: torch.Tensor, weight: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mapper and slot weights over ``columns`` text columns, when the map has more than the token maps.

    SD3 run without T5 appends the pipeline's zero rows after the CLIP tokens
    (256 by default): the same in every prompt, so each one maps to itself and
    is replaced like the padding after the last word (the last slot's weight).
    """
    n, length, _ = matrix.shape
    if columns == length:
        return matrix, weight
    wide = torch.zeros(n, columns, columns, dtype=matrix.dtype)
    wide[:, :length, :length] = matrix
    wide[:, length:, length:] = torch.eye(columns - length, dtype=matrix.dtype)
    extra = weight[:, -1:].expand(n, columns - length)
    return wide, torch.cat([weight, extra], dim=1)


class Replace(CrossAttentionEdit):
    """Word swap (prompt-to-prompt ``AttentionReplace``): target word ``k`` gets source word ``k``'s maps.

    The prompts must have the same number of words; a word of ``n`` BPE pieces
    may be swapped for one of ``m`` pieces (its maps are stretched, see
    :func:`xattn.edit.align.stretch`). Arguments as :class:`CrossAttentionEdit`.

    Example (both rows start from one latent; :func:`xattn.edit.edit` does this for you)::

        latent = torch.randn(1, 4, 64, 64).expand(2, -1, -1, -1)
        with xattn.hooks(pipe, Replace(steps=0.8), SelfInject(steps=0.4)):
            pipe(["a red circle", "a green circle"], latents=latent)
    """

    mode = "replace"


class Refine(CrossAttentionEdit):
    """Refinement (prompt-to-prompt ``AttentionRefine``): shared pieces take the source's maps, new ones keep theirs.

    Pieces are matched by a global alignment of the two token lists
    (:func:`xattn.edit.align.align_tokens`). Arguments as :class:`CrossAttentionEdit`.
    """

    mode = "refine"


class AutoEdit(CrossAttentionEdit):
    """Replace where a target has as many words as the source, Refine otherwise (per target)."""

    mode = "auto"


class SelfInject(Controller):
    """Copy the source's self-attention maps into the target rows at chosen resolutions and steps.

    prompt-to-prompt's ``self_replace_steps``: injecting self-attention early
    keeps the source's structure more firmly. The map is ``[i, i]`` per head,
    the largest tensor of a UNet step, and it is never materialised: at the
    ``map_rows`` point a target row borrows its source row's queries and keys,
    so fused SDPA computes softmax(Q_src K_src^T) V_tgt, exactly the copied map
    applied to the target's values. Injection costs no more time or memory
    than plain attention.

    Args:
        steps: window of steps (``"0:0.4"``, ``0.4``, ``"0:10"``); ``None`` injects nowhere.
        res: which map sizes (``"<=32"`` by default: the larger side of the
            site's map, derived from the call's latent size).
        selector: further restricts the self-attention sites; ``kind=joint`` injects at joint sites
            instead (a transformer's image and text queries, the whole joint map).
        rows: ``"cond"`` (default) or ``"all"``.

    """

    def __init__(self, steps: WindowSpec = SELF_STEPS, res: str | None = SELF_RES, *,
                 selector: Selector | str | dict | None = None, rows: str = "cond"):
        self.window = parse_window(steps, what="SelfInject steps")
        try:
            kind = "joint" if Selector.coerce(selector).kind == "joint" else "self"
        except SelectorError:
            kind = "self"  # _own_selector names the error
        selector = _own_selector(selector, kind, "SelfInject")
        if res is not None:
            if selector.res is not None:
                raise EditError("SelfInject: give the resolutions once, as `res=` or in the selector")
            try:
                selector = replace(selector, res=Selector.parse(f"res={res}").res)
            except SelectorError as error:
                raise EditError(f"SelfInject res: {error}") from None
        self.selector = selector
        self.rows = check_rows(rows)
        self.reset()

    def begin_run(self, run: Run) -> None:
        """Which rows borrow which, and at which steps, once per run."""
        self._pairs = row_pairs(run.layout, self.rows)
        self._steps = steps_in(self.window, run.num_steps, "SelfInject steps")

    def reset(self) -> None:
        self._pairs: RowPairs | None = None
        self._steps: frozenset[int] = frozenset()

    def active(self, ctx: HookContext) -> bool:
        return ctx.step in self._steps

    def map_rows(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        pairs = self._pairs
        x[pairs.target] = pairs.source  # each target row attends with its source's map (indices on the CPU)
        return x

    def to_dict(self) -> dict:
        return {"edit": "self_inject", "steps": describe(self.window), "selector": str(self.selector),
                "rows": self.rows}

    def __repr__(self) -> str:
        return f"SelfInject(steps={describe(self.window)!r}, selector='{self.selector}')"


__all__ = ["SELF_RES", "AutoEdit", "CrossAttentionEdit", "Refine", "Replace", "SelfInject", "token_maps_of"]

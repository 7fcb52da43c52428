"""Capture: keep the attention maps a selector picks, with memory that stays bounded.

Two modes:

- aggregated (default): one running float32 sum per (kind, resolution; the mid
  block apart) on the device, conditional rows only, heads averaged, and at
  cross sites only the token slots the prompts use (start, pieces, end) plus
  one column for the summed padding. Each attention call adds its maps into
  the preallocated sum (through one transient head sum), so memory does not
  grow with the number of steps.
- per-step: one map per (step, site), stored in fp16, for inspecting how maps
  evolve; under a byte budget that is checked before anything is stored, and
  optionally streamed to disk as one safetensors shard per step.

At joint sites (SD3, Flux) a capture keeps the image->text block, the text
map; ``blocks=`` keeps the image->image, text->image and text->text blocks too,
read from the whole joint map the explicit path hands its ``probs`` hooks
(:func:`xattn.joint.whole_joint_map`), under the same budget.

Only the selected sites, resolutions and steps leave the fused SDPA path (the
core runs a ``probs`` hook only where the selector and :meth:`Capture.active`
say so). After the pipeline call, :meth:`Capture.maps` returns the word maps.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..hookpoints import Controller, HookContext
from ..selector import Selector
from ..sites import Site
from .layers import BLOCK_KIND, JOINT_BLOCKS, TEXT_KINDS, MapLayer, block_kind
from .plan import (CaptureBlocksError, CaptureBudgetError, PlannedSite, RowPart, RunState, Slice, format_bytes,
                   parse_bytes, res_at, site_downsampling, token_columns)

DEFAULT_BUDGET = "1GiB"
DEFAULT_SELF_RES = 32  # self-attention maps are [i, i]: 64x64 sites would need 64 MiB per row and call
DEFAULT_TEXT_LENGTH = 77  # CLIP's padded sequence, used when no tokenizer is known
SLOT_CHOICES = ("prompt", "all")


class Capture(Controller):
    """Capture the attention maps a selector picks; ``maps()`` turns them into word maps.

    Args:
        selector: which sites / res / steps / heads / tokens (a Selector, its
            string form or a dict). Default: every cross site at every step.
        per_step: keep one map per (step, site) instead of running sums (default
            off; on for encoder-decoder models, where a step is a target position).
        keep_heads: keep each selected head instead of their mean (aggregated
            sums are then kept per site, since sites differ in head count;
            default off, on for encoder-decoder models).
        uncond: also keep classifier-free guidance's unconditional rows. Under Flux's true CFG
            (a negative prompt and ``true_cfg_scale > 1``) they come from the negative prompt's
            call of each step and are stored with the prompts' rows as one batched call would
            store them (same sums, same counts, ``cond=False`` in the word maps).
        self_attention: also capture self-attention (opt-in), at sites no
            larger than ``self_res``.
        self_res: the largest self-attention map side to capture.
        budget: the most bytes the capture may hold (``"256MB"``, an int, or
            None for no limit); checked before anything is stored.
        storage_dtype: dtype of per-step maps (running sums are float32).
        slots: which token slots to keep at cross sites when the selector names no
            ``tokens``: ``"prompt"`` (default) keeps the start token, the prompts'
            pieces and their end token, plus one column with the summed attention
            on the padding after them (so shares still add up to 1);
            ``"all"`` keeps every slot of the text sequence (77 for CLIP).
        stream_to: a folder that does not exist yet (or is empty); per-step maps
            are written there as one safetensors shard per step and only the
            current step is held in memory.
        blocks: at joint sites (SD3, Flux), which blocks of the joint attention to
            keep, named ``"queries->keys"``: ``"image->text"`` (always kept: the
            text map word maps read), ``"image->image"``, ``"text->image"``,
            ``"text->text"``. The others keep every text slot (``slots`` and
            ``tokens`` choose the image->text columns only), the selected heads and
            rows, and count against ``budget``; read them with
            ``maps().block("text->image")``. Every selected site must be a joint site.

    Example::

        capture = xattn.Capture()
        with xattn.hooks(pipe, capture):
            image = pipe("a red circle and a blue square").images[0]
        heat = capture.maps().word("circle")  # [H, W] at the image's size
    """

    slices = frozenset({"heads", "tokens"})  # Capture keeps only the heads and token slots its selector names

    def __init__(self, selector: Selector | str | dict | None = None, *, per_step: bool | None = None,
                 keep_heads: bool | None = None, uncond: bool = False, self_attention: bool = False,
                 self_res: int = DEFAULT_SELF_RES, budget: int | str | None = DEFAULT_BUDGET,
                 storage_dtype: torch.dtype = torch.float16, stream_to: str | Path | None = None,
                 slots: str = "prompt", blocks: str | tuple[str, ...] | list[str] = ("image->text",)):
        chosen = Selector.coerce(selector)
        if chosen.kind in ("self", "all") and not self_attention:
            raise ValueError(
                f"the selector asks for kind={chosen.kind}, but self-attention capture is opt-in: "
                "pass self_attention=True (maps are [i, i], so only sites up to self_res are kept)"
            )
        if chosen.kind is None:
            chosen = replace(chosen, kind="all" if self_attention else "cross")
        if stream_to is not None and not per_step:
            raise ValueError("stream_to writes per-step maps to disk; pass per_step=True as well")
        if not isinstance(self_res, int) or self_res < 1:
            raise ValueError(f"self_res must be a positive map side such as 32, not {self_res!r}")
        if slots not in SLOT_CHOICES:
            raise ValueError(f"slots must be one of {', '.join(map(repr, SLOT_CHOICES))}, not {slots!r}")
        if not storage_dtype.is_floating_point:
            raise ValueError(f"storage_dtype must be a float dtype (torch.float16, torch.float32), not {storage_dtype}")
        self.blocks = _blocks(blocks)
        self.selector = chosen
        self.asked = {"per_step": per_step, "keep_heads": keep_heads}  # None: the model's default (see bind)
        self.per_step = bool(per_step)
        self.keep_heads = bool(keep_heads)
        self.uncond = uncond
        self.self_res = self_res
        self.budget = parse_bytes(budget)
        self.storage_dtype = storage_dtype
        self.slots = slots
        self.stream_to = None if stream_to is None else Path(stream_to)
        self._factors: dict[str, int] = {}
        self._sites: list[Site] = []
        self._vae_scale = 1
        self._text_length: int | None = None
        self.model_info: dict = {}
        self._heads: dict[str, Slice | None] = {}
        self.reset()

    # -- protocol ------------------------------------------------------------------
    def bind(self, session) -> None:
        """Learn the model's sites, their sizes and the image scale before any call."""
        self._sites = session.sites
        self._check_blocks(session.sites)
        self._factors = site_downsampling(session.denoiser)
        model = session.model
        is_pipeline = model is not session.denoiser
        self._vae_scale = int(getattr(model, "vae_scale_factor", 1) or 1) if is_pipeline else 1
        tokenizer = getattr(model, "tokenizer", None) if is_pipeline else None
        self._text_length = getattr(tokenizer, "model_max_length", None)
        config = getattr(session.denoiser, "config", {})
        scheduler = getattr(model, "scheduler", None) or session.scheduler
        identity = getattr(model, "xattn_identity", None) or {}  # set by xattn.app.loading.load_pipeline
        self.model_info = {
            "model": str(identity.get("model") or getattr(config, "_name_or_path", "") or type(session.denoiser).__name__),
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        }

    def reset(self) -> None:
        """Forget the previous call's maps (the session calls this when a pipeline call starts)."""
        self._run: RunState | None = None
        self.calls: Counter = Counter()  # (site name, step) -> attention calls captured

    def active(self, ctx: HookContext) -> bool:
        if ctx.site.kind == "self" and max(ctx.res) > self.self_res:
            return False
        if not self.uncond and ctx.layout.rows and not any(row.cond for row in ctx.layout.rows):
            return False  # a call of unconditional rows only (Flux's true CFG): nothing to keep, stays fused
        heads = self._head_choice(ctx.site)
        return heads is None or heads.count > 0

    def probs(self, x: torch.Tensor, ctx: HookContext) -> None:
        """Reduce this call's maps into the store; never changes them."""
        run = self._run or self._start(ctx, x)
        part = run.part if ctx.layout is run.layout else self._part_of(run, ctx)
        site = ctx.site
        picked = part.choice.take(x, 0)  # [r, h, i, j]
        heads = self._head_choice(site)
        if heads is not None:
            picked = heads.take(picked, 1)  # [r, h', i, j]
        padding = None
        if site.kind in TEXT_KINDS:
            if run.others:
                kept = len(run.columns)
                padding = picked.narrow(3, kept, picked.shape[3] - kept)  # [r, h', i, j - j']
            picked = run.column_choice.take(picked, 3)  # [r, h', i, j']
        self._store(run, part, picked, padding, ctx, site.kind)
        if self._extra_blocks and site.kind == "joint":
            self._keep_blocks(run, part, ctx)
        if part.counts:  # true CFG's second call adds its rows to the attention call the first one counted
            self.calls[(site.name, ctx.step)] += 1
        return None

    # -- joint blocks ----------------------------------------------------------------
    @property
    def _extra_blocks(self) -> tuple[str, ...]:
        return tuple(block for block in self.blocks if block != "image->text")

    def _check_blocks(self, site_list: list[Site]) -> None:
        """Blocks other than image->text exist at joint sites only: refuse any other selected site."""
        if not self._extra_blocks:
            return
        others = [site for site in site_list if self.selector.matches_site(site) and site.kind != "joint"]
        if others:
            listed = ", ".join(f"{site.name} ({site.kind})" for site in others[:3])
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            raise CaptureBlocksError(
                f"blocks={list(self._extra_blocks)} are blocks of joint attention (SD3, Flux), but the capture's "
                f"selector also takes sites that are not joint: {listed}{more}. Select joint sites only "
                "(kind=joint), or keep blocks=('image->text',)")

    def _keep_blocks(self, run: RunState, part: RowPart, ctx: HookContext) -> None:
        """Store the requested blocks of the whole joint map the explicit path hands over."""
        from ..joint import whole_joint_map

        handed = whole_joint_map()
        if handed is None:
            raise CaptureBlocksError(f"{ctx.site.name}: its processor handed over no joint map, so blocks "
                                     f"{list(self._extra_blocks)} cannot be kept there")
        probs, parts = handed
        image, text = parts.rows, parts.columns
        spans = {"image->image": (image, image), "text->image": (text, image), "text->text": (text, text)}
        heads = self._head_choice(ctx.site)
        for block in self._extra_blocks:
            queries, keys = spans[block]
            picked = part.choice.take(probs.detach()[:, :, queries, keys], 0)  # [r, h, q, k]
            if heads is not None:
                picked = heads.take(picked, 1)
            self._store(run, part, picked, None, ctx, block_kind(block))

    def _store(self, run: RunState, part: RowPart, picked: torch.Tensor, padding: torch.Tensor | None,
               ctx: HookContext, kind: str) -> None:
        if self.per_step:
            self._keep_step(run, part, picked, padding, ctx, kind)
        else:
            self._add_to_sum(run, part, picked, padding, ctx, kind)

    # -- storing -------------------------------------------------------------------
    def _add_to_sum(self, run: RunState, part: RowPart, picked: torch.Tensor, padding: torch.Tensor | None,
                    ctx: HookContext, kind: str) -> None:
        group = self._sum_group(ctx.site, ctx.res, kind)
        layer = run.layers.get(group)
        if layer is None:
            layer = self._new_layer(run, group, picked, ctx, steps=(), dtype=torch.float32, others=padding is not None,
                                    kind=kind)
            run.sites[group], run.steps[group] = set(), set()
        kept = picked.shape[3]
        data = part.of(layer.data)  # this call's rows of the sum
        if self.keep_heads:
            data[..., :kept].add_(picked)
            if padding is not None:
                data[..., kept:].add_(padding.sum(dim=3, keepdim=True))
        else:  # heads averaged through a transient [r, 1, i, j'] sum, freed at once: only the running sum is held
            share = 1.0 / picked.shape[1]
            data[..., :kept].add_(picked.sum(dim=1, keepdim=True, dtype=torch.float32), alpha=share)
            if padding is not None:
                data[..., kept:].add_(padding.sum(dim=(1, 3), keepdim=True, dtype=torch.float32), alpha=share)
        if part.counts:
            layer.count += 1
        run.sites[group].add(ctx.site.name)
        if ctx.step is not None:
            run.steps[group].add(ctx.step)

    def _keep_step(self, run: RunState, part: RowPart, picked: torch.Tensor, padding: torch.Tensor | None,
                   ctx: HookContext, kind: str) -> None:
        if self.stream_to is not None and ctx.step != run.streaming_step:
            self._flush_stream(run)
            run.streaming_step = ctx.step
        if padding is not None:
            picked = torch.cat([picked, padding.sum(dim=3, keepdim=True)], dim=3)  # [r, h', i, j' + 1]
        maps = picked if self.keep_heads else picked.mean(dim=1, keepdim=True)  # [r, h'|1, i, j]
        group = (ctx.step, ctx.site.name) if kind == ctx.site.kind else (ctx.step, ctx.site.name, kind)
        layer = run.layers.get(group)
        if layer is None:
            steps = () if ctx.step is None else (ctx.step,)
            layer = self._new_layer(run, group, picked, ctx, steps=steps, dtype=self.storage_dtype, kind=kind)
        part.of(layer.data).add_(maps.to(self.storage_dtype))  # a scheduler may call the UNet twice per step (Heun)
        if part.counts:
            layer.count += 1

    def _sum_group(self, site: Site, res: tuple[int, int], kind: str | None = None) -> tuple:
        """The running sum a site adds into: its own when heads are kept, else one per (kind, res, mid or not).

        The mid block gets sums of its own so that word maps can leave it out
        (they do by default, see docs/maps.md) even where it shares a size with other blocks.
        """
        kind = site.kind if kind is None else kind
        if self.keep_heads:
            return (kind, site.name)
        return (kind, res, site.block == "mid")

    def _new_layer(self, run: RunState, group: tuple, picked: torch.Tensor, ctx: HookContext, *,
                   steps: tuple[int, ...], dtype: torch.dtype, others: bool = False, kind: str) -> MapLayer:
        kept_heads = None
        if self.keep_heads:
            kept_heads = tuple(self.selector.head_indices(ctx.site.heads) or range(ctx.site.heads))
        _, h, i, j = picked.shape
        shape = (len(run.rows), h if self.keep_heads else 1, i, j + others)
        data = torch.zeros(shape, dtype=dtype, device=picked.device)
        layer = MapLayer(kind=kind, res=ctx.res, steps=steps, sites=(ctx.site.name,), count=0,
                         heads=kept_heads, data=data)
        run.layers[group] = layer
        held = self.bytes_held()
        if self.budget is not None and held > self.budget:  # a safety net: the plan should have refused already
            raise CaptureBudgetError(
                f"capture now holds {format_bytes(held)}, over its budget of {format_bytes(self.budget)} "
                f"(at {ctx.site.name}, step {ctx.step}); the plan made at the first call was "
                f"{format_bytes(run.planned_bytes)}"
            )
        return layer

    def _flush_stream(self, run: RunState) -> None:
        """Write the held step's maps to one shard and drop them from memory."""
        held = [(group, layer) for group, layer in run.layers.items() if layer.data is not None]
        if not held:
            return
        step = run.streaming_step
        shard = self.stream_to / f"step_{'none' if step is None else f'{step:04d}'}.safetensors"
        if shard.exists():
            raise FileExistsError(f"{shard} already exists; stream each run to a new folder")
        tensors = {_stream_key(layer): layer.data.contiguous().cpu() for _, layer in held}
        save_file(tensors, str(shard))
        for _, layer in held:
            layer.shard, layer.key, layer.data = shard, _stream_key(layer), None
        run.shards.append(shard)

    def _prepare_stream_folder(self) -> None:
        """Refuse a used folder at the start of a run, so no earlier maps are overwritten."""
        folder = self.stream_to
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"stream folder {folder} is not empty; give a new folder so earlier maps are not overwritten"
            )
        folder.mkdir(parents=True, exist_ok=True)

    # -- the first call of a run: rows, columns, sizes, budget --------------------
    def _start(self, ctx: HookContext, x: torch.Tensor) -> RunState:
        layout = ctx.layout
        rows = list(range(layout.batch_size)) if self.uncond else layout.row_indices(cond=True)
        if not rows:
            raise ValueError(f"this call has no conditional rows to capture (layout: {layout.rows}); pass uncond=True")
        text = ctx.site.kind in TEXT_KINDS
        key_length = x.shape[-1] if text else (self._text_length or DEFAULT_TEXT_LENGTH)
        columns, others = token_columns(layout, key_length, self.selector.tokens, self.slots)
        factor = self._factors.get(ctx.site.name)
        if factor is None:  # a transformer: every site sees the patch grid, latent = patch x grid
            latent_hw = tuple(ctx.latent_hw)
            factor = max(1, latent_hw[0] // ctx.res[0])
        else:
            latent_hw = (ctx.res[0] * factor, ctx.res[1] * factor)
        image_hw = (latent_hw[0] * self._vae_scale, latent_hw[1] * self._vae_scale)
        run = RunState(layout, rows, columns, key_length, latent_hw, image_hw, ctx.num_steps, others)
        run.patch = factor if not self._factors else 1
        run.first_step = ctx.step
        run.planned_bytes = self._check_budget(run, ctx, key_length)
        if self.stream_to is not None:
            self._prepare_stream_folder()
        self._run = run
        return run

    def plan(self, run: RunState, key_length: int) -> list[PlannedSite]:
        """The sites this run will capture, with their sizes (from the model's structure)."""
        planned = []
        for site in self._sites:
            if not self.selector.matches_site(site):
                continue
            res = res_at(run.latent_hw, self._factors.get(site.name, run.patch))
            if not self.selector.matches_res(res) or (site.kind == "self" and max(res) > self.self_res):
                continue
            heads = self._head_choice(site)
            count = site.heads if heads is None else heads.count
            if count == 0:
                continue
            if site.kind in TEXT_KINDS:
                keys = key_length if run.columns is None else len(run.columns) + run.others
            else:
                keys = res[0] * res[1]
            kept_heads = count if self.keep_heads else 1
            planned.append(PlannedSite(site, res, kept_heads, keys))
            if site.kind == "joint":  # the other blocks keep every text slot (key_length at a joint site)
                image = res[0] * res[1]
                sizes = {"image->image": (image, image), "text->image": (key_length, image),
                         "text->text": (key_length, key_length)}
                for block in self._extra_blocks:
                    queries, keys = sizes[block]
                    planned.append(PlannedSite(site, res, kept_heads, keys, queries=queries, kind=block_kind(block)))
        return planned

    def _check_budget(self, run: RunState, ctx: HookContext, key_length: int, rows: int | None = None) -> int:
        planned = self.plan(run, key_length)
        rows = len(run.rows) if rows is None else rows
        if self.per_step:
            steps = self._selected_steps(ctx)
            held_steps = 1 if self.stream_to is not None else len(steps)
            itemsize = torch.empty((), dtype=self.storage_dtype).element_size()
            needed = held_steps * sum(p.bytes_per_call(rows, itemsize) for p in planned)
            what = (f"per-step capture of {len(steps)} step(s) x {len({p.site.name for p in planned})} site(s)"
                    + (" (one step held at a time)" if self.stream_to is not None else ""))
        else:
            groups: dict[tuple, PlannedSite] = {}
            for p in planned:
                groups[self._sum_group(p.site, p.res, p.kind)] = p
            needed = sum(p.bytes_per_call(rows, 4) for p in groups.values())  # one float32 running sum each
            what = (f"aggregated capture of {len({p.site.name for p in planned})} site(s) in {len(groups)} "
                    "running sum(s)")
        if self._extra_blocks:
            what += f" with joint blocks {', '.join(self.blocks)}"
        if self.budget is not None and needed > self.budget:
            raise CaptureBudgetError(
                f"{what} for {rows} row(s) needs {format_bytes(needed)}, over the budget of "
                f"{format_bytes(self.budget)}. Raise budget=, select fewer steps, sites or resolutions, "
                "average the heads, " + ("keep fewer blocks=, " if self._extra_blocks else "")
                + "or pass stream_to=FOLDER to keep one step in memory"
            )
        return needed

    def _selected_steps(self, ctx: HookContext) -> list[int]:
        if ctx.num_steps is None:
            return [ctx.step] if ctx.step is not None else [0]
        return [s for s in range(ctx.num_steps) if self.selector.matches_step(s, ctx.num_steps)]

    def _head_choice(self, site: Site) -> Slice | None:
        if site.name not in self._heads:
            indices = self.selector.head_indices(site.heads)
            self._heads[site.name] = None if indices is None else Slice(indices, site.heads)
        return self._heads[site.name]

    def _part_of(self, run: RunState, ctx: HookContext) -> RowPart:
        """The part of the run whose rows this call hands over; true CFG's second call adds its own."""
        layout = ctx.layout
        part = next((p for p in run.parts if p.matches(layout)), None)
        if part is None:
            part = self._other_half(run, ctx)
            if part is None:
                raise ValueError(
                    "the batch changed during one capture run; call capture.reset() (or start a new pipeline "
                    "call) before capturing a different batch"
                )
            try:  # the plan again, for both halves' rows, before any sum grows
                planned = self._check_budget(run, ctx, run.key_length, rows=len(run.rows) + len(part.rows))
            except CaptureBudgetError:
                self._run = None  # as when the first call's plan is refused: no half-kept run stays behind
                raise
            run.add_part(part, first=not part.rows[0].cond)  # unconditional rows first, as diffusers batches them
            run.planned_bytes = planned
        run.layout, run.part = layout, part
        return part

    def _other_half(self, run: RunState, ctx: HookContext) -> RowPart | None:
        """The rows of a call that holds the other half of classifier-free guidance, or None.

        Flux's true CFG calls the transformer on the prompts' rows, then on the
        negative prompts' rows, at the same step. With ``uncond=True`` the second
        call's rows are kept with the first's, as a pipeline that batches both
        keeps them: only when that call comes at the run's first captured step,
        for the same prompts and images, with the other kind of row.
        """
        layout = ctx.layout
        if not self.uncond or len(run.parts) != 1 or ctx.step != run.first_step or layout.prompts != run.layout.prompts:
            return None
        first, rows = run.parts[0].rows, layout.rows
        kinds = {row.cond for row in rows}
        if len(kinds) != 1 or {row.cond for row in first} != {not kinds.pop()}:
            return None
        if sorted((row.prompt, row.image) for row in rows) != sorted((row.prompt, row.image) for row in first):
            return None
        return RowPart(layout, list(range(layout.batch_size)), counts=False)

    # -- results ---------------------------------------------------------------------
    def bytes_held(self) -> int:
        """Bytes of maps this capture holds in memory now."""
        run = self._run
        if run is None:
            return 0
        return sum(layer.nbytes for layer in run.layers.values())

    @property
    def planned_bytes(self) -> int:
        """What the plan at the first call said this run would hold (0 before any call)."""
        return 0 if self._run is None else self._run.planned_bytes

    def maps(self):
        """The word maps of the last pipeline call (see :class:`xattn.capture.WordMaps`).

        Aggregated sums are copied, so later calls do not change the returned maps.
        """
        from .heatmaps import WordMaps

        run = self._run
        if run is None:
            raise RuntimeError(
                "nothing was captured: run the pipeline inside `with xattn.hooks(pipe, capture):` first "
                "(and check that the selector matches some site, step and resolution)"
            )
        if self.stream_to is not None:
            self._flush_stream(run)
        layers = []
        for group, layer in run.layers.items():
            if not self.per_step:  # a snapshot: the running sums go on growing if the model is called again
                layer = replace(layer, data=layer.data.clone(), sites=tuple(sorted(run.sites[group])),
                                steps=tuple(sorted(run.steps[group])))
            layers.append(layer)
        layout = run.layout
        return WordMaps(
            layers,
            rows=run.rows,
            columns=run.columns,
            others=run.others,
            prompts=list(layout.prompts),
            token_maps=list(layout.token_maps),
            image_size=run.image_hw,
            num_steps=run.num_steps,
            info=dict(self.model_info),
        )


def _blocks(blocks: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The joint blocks to keep, image->text first, in :data:`JOINT_BLOCKS` order; unknown names refused."""
    named = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    unknown = [block for block in named if block not in JOINT_BLOCKS]
    if unknown:
        raise CaptureBlocksError(f"unknown joint block(s) {unknown}; blocks are named queries->keys: "
                                 f"{', '.join(map(repr, JOINT_BLOCKS))}")
    return tuple(block for block in JOINT_BLOCKS if block == "image->text" or block in named)


def _stream_key(layer: MapLayer) -> str:
    """A per-step layer's tensor name in its step's shard: the site, and the block for joint blocks."""
    site = layer.sites[0]
    return f"{site}|{layer.kind[len(BLOCK_KIND):]}" if layer.kind.startswith(BLOCK_KIND) else site

"""Word heat maps from captured attention (DAAM's idea, our code).

A word's map is the attention its token slots receive at every query
position, combined over what was captured: each layer's sum is reduced to the
word (its BPE pieces summed, heads averaged) at its own resolution,
upsampled to a common size (the generated image's; bicubic, clamped at 0, by
default), added up over layers, sites and steps, and divided by the number of
attention calls. The mid block is left out by default (its maps are the
coarsest, 1/8 of the latent's side in SD). The result is the mean attention
probability on the word at each pixel; with ``normalize=True`` it is min-max
scaled to [0, 1] for display and thresholds. Why these defaults: docs/maps.md.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..hookpoints import BatchLayout, Row
from ..selector import Selector, SelectorError
from ..tokens import TokenError, TokenMap
from .layers import JOINT_BLOCKS, TEXT_KINDS, MapLayer, block_kind

StepsArg = str | range | tuple[int, int] | Iterable[int] | None
ResArg = int | str | tuple[int, int] | None

DEFAULT_EXCLUDE = "mid_block.*"  # sites word maps leave out unless told otherwise (docs/maps.md)
DEFAULT_UPSAMPLE = "bicubic"
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


class WordMaps:
    """The maps of one captured pipeline call: every prompt, every image.

    Args:
        layers: the captured sums (see :class:`~xattn.capture.layers.MapLayer`).
        rows: what each captured row is (cond / prompt / image), in tensor order.
        columns: the token slots kept at cross sites, or None for all.
        others: the tensors hold one more column after ``columns``: the summed
            attention on every other slot (the padding after the prompts).
        prompts: the prompts of the call (may be empty for bare model calls).
        token_maps: one TokenMap per prompt (None where unknown).
        image_size: (H, W) of the generated images: maps come out at this size.
        num_steps: the schedule's length, for fractional step ranges.
        info: model, scheduler and similar facts, kept for the export.
    """

    def __init__(self, layers: list[MapLayer], *, rows: tuple[Row, ...], columns: list[int] | None,
                 prompts: list[str | None], token_maps: list[TokenMap | None], image_size: tuple[int, int],
                 num_steps: int | None = None, info: dict | None = None, others: bool = False):
        self.layers = list(layers)
        self.rows = tuple(rows)
        self.columns = None if columns is None else list(columns)
        if others and (self.columns is None or self.columns != list(range(len(self.columns)))):
            raise ValueError("a padding column follows kept slots 0..k-1 only")
        self.others = bool(others)
        self.prompts = list(prompts)
        self.token_maps = list(token_maps)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_steps = num_steps
        self.info = dict(info or {})
        self._column_of = None if columns is None else {slot: k for k, slot in enumerate(columns)}

    # -- what is there ----------------------------------------------------------------
    @property
    def num_prompts(self) -> int:
        return BatchLayout(rows=self.rows).num_prompts

    @property
    def images_per_prompt(self) -> int:
        return BatchLayout(rows=self.rows).images_per_prompt

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """Resolutions of the captured cross-attention maps, largest first."""
        return sorted({layer.res for layer in self._cross()}, reverse=True)

    @property
    def word_resolutions(self) -> list[tuple[int, int]]:
        """Resolutions that go into default word maps (the mid block's own sums left out), largest first."""
        return sorted({layer.res for layer in self._select(None, None, None, DEFAULT_EXCLUDE)}, reverse=True)

    @property
    def steps(self) -> list[int]:
        return sorted({step for layer in self._cross() for step in layer.steps})

    @property
    def per_step(self) -> bool:
        """True when steps can be chosen one by one (captured with ``per_step=True``)."""
        return all(len(layer.steps) <= 1 for layer in self._cross())

    def token_map(self, prompt: int = 0) -> TokenMap:
        self._check_prompt(prompt)
        if prompt >= len(self.token_maps) or self.token_maps[prompt] is None:
            raise LookupError("the prompts of this capture are unknown; look tokens up by slot index instead")
        return self.token_maps[prompt]

    def words(self, prompt: int = 0) -> list[str]:
        """The prompt's words as lookup keys (``word#2`` for a repeated word's second use)."""
        token_map = self.token_map(prompt)
        totals: dict[str, int] = {}
        for word in token_map.words:
            totals[word.key] = totals.get(word.key, 0) + 1
        return [w.text if totals[w.key] == 1 else f"{w.text}#{w.occurrence}" for w in token_map.words
                if self._captured(w.slots)]

    # -- word maps ----------------------------------------------------------------------
    def word(self, word: str | int, prompt: int = 0, image: int = 0, *, steps: StepsArg = None,
             res: ResArg = None, sites: str | None = None, heads: Iterable[int] | None = None,
             normalize: bool = True, size: tuple[int, int] | None = None, cond: bool = True,
             exclude: str | None = DEFAULT_EXCLUDE, upsample: str = DEFAULT_UPSAMPLE) -> torch.Tensor:
        """The heat map of a word, phrase, ``<start>``/``<end>``/``<pad>`` or slot index: ``[H, W]`` float32.

        Args:
            word: ``"cat"`` (every occurrence), ``"cat#2"``, ``"red circle"``, ``"<end>"`` or ``5``.
            prompt: index of the prompt in the pipeline call.
            image: index of the image among that prompt's images.
            steps: a step range (``"0:10"``, ``"0:0.5"``, ``range(3)``, ``(0, 10)``); needs a per-step capture
                unless it covers every captured step.
            res: only maps of this size (``16``, ``"<=16"``, ``(16, 16)``).
            sites: only sites matching this glob (``"up_blocks.*"``); needs per-site sums
                (``per_step=True`` or ``keep_heads=True``) unless it covers whole resolutions.
            heads: average only these heads (needs ``keep_heads=True`` at capture).
            normalize: min-max scale to [0, 1] (False: mean attention probability per pixel).
            size: output (H, W); default the generated image's size.
            cond: the conditional row (False: the unconditional one, if captured).
            exclude: leave out sites matching this glob; default the mid block, unless ``sites``
                is given or nothing else matches (``res=`` of its size alone); None keeps every site.
            upsample: ``"bicubic"`` (clamped at 0), ``"bilinear"`` or ``"nearest"``: how each
                resolution's map is brought to ``size``.
        """
        total, count = self.word_total(word, prompt, image, steps=steps, res=res, sites=sites, heads=heads,
                                       size=size, cond=cond, exclude=exclude, upsample=upsample)
        heat = (total / count).clamp(min=0)  # bicubic overshoots below 0 next to sharp edges
        if normalize:
            heat = _min_max(heat)
        return heat.float()

    def word_total(self, word: str | int, prompt: int = 0, image: int = 0, *, steps: StepsArg = None,
                   res: ResArg = None, sites: str | None = None, heads: Iterable[int] | None = None,
                   size: tuple[int, int] | None = None, cond: bool = True,
                   exclude: str | None = DEFAULT_EXCLUDE, upsample: str = DEFAULT_UPSAMPLE) -> tuple[torch.Tensor, int]:
        """The upsampled sum behind :meth:`word` and the number of attention calls in it (float64).

        Sums over step ranges add, so a viewer can combine them and divide once
        (:meth:`word` then clamps at 0 what bicubic upsampling undershoots).
        """
        row = self._row(prompt, image, cond)
        positions = self._positions(word, prompt)
        layers = self._select(steps, res, sites, exclude)
        size = self.image_size if size is None else (int(size[0]), int(size[1]))
        at_res: dict[tuple[int, int], torch.Tensor] = {}
        count = 0
        for layer in layers:
            maps = layer.tensor()[row]  # [heads, i, j]
            maps = maps[:, :, positions].sum(dim=-1).double()  # [heads, i]: the word's pieces merged
            maps = maps[self._head_positions(layer, heads)].mean(dim=0)  # [i]
            at_res[layer.res] = at_res.get(layer.res, 0) + maps
            count += layer.count
        total = torch.zeros(size, dtype=torch.float64)
        for (h, w), flat in at_res.items():
            total += upsample_maps(flat.view(1, h, w), size, upsample)[0]
        return total, count

    def totals_by_step_and_res(self, words: list[str | int], prompt: int = 0, image: int = 0, *,
                               size: tuple[int, int] | None = None, exclude: str | None = DEFAULT_EXCLUDE,
                               upsample: str = DEFAULT_UPSAMPLE,
                               ) -> dict[tuple[int | None, tuple[int, int]], tuple[torch.Tensor, int]]:
        """Upsampled word sums for every (step, resolution) separately, in one pass over the layers.

        Keys are ``(step, res)`` for per-step captures and ``(None, res)`` for
        aggregated ones; values are (``[len(words), H, W]`` float64 sums, calls).
        A viewer adds the sums of the steps and resolutions it wants and
        divides by the added calls, which gives exactly :meth:`word`'s mean.
        """
        row = self._row(prompt, image, True)
        positions = [self._positions(word, prompt) for word in words]
        size = self.image_size if size is None else (int(size[0]), int(size[1]))
        out: dict = {}
        for layer in self._select(None, None, None, exclude):
            maps = layer.tensor()[row].double().mean(dim=0)  # [i, j], heads averaged
            per_word = torch.stack([maps[:, cols].sum(dim=-1) for cols in positions])  # [words, i]
            upsampled = upsample_maps(per_word.view(len(words), *layer.res), size, upsample)  # [words, H, W]
            key = (layer.steps[0] if self.per_step and layer.steps else None, layer.res)
            total, count = out.get(key, (0, 0))
            out[key] = (total + upsampled, count + layer.count)
        return out

    def token_totals(self, prompt: int = 0, image: int = 0) -> dict[str, float]:
        """Share of all captured attention that each word (and ``<start>``, ``<end>``, ``<pad>``) gets.

        The shares of every slot sum to 1 (when every slot was captured; at joint
        sites, to the share the image gives the text, since image keys share the
        softmax); this is the "how much did the image look at this word" number.
        """
        row = self._row(prompt, image, True)
        per_slot = None
        queries = 0
        for layer in self._cross():
            maps = layer.tensor()[row]  # [heads, i, j]
            mass = maps.double().mean(dim=0).sum(dim=0)  # [j]
            per_slot = mass if per_slot is None else per_slot + mass
            queries += layer.count * layer.res[0] * layer.res[1]
        if per_slot is None:
            raise LookupError("no cross-attention was captured")
        share = per_slot / queries
        slots = self.columns if self.columns is not None else list(range(share.shape[0]))
        token_map = self.token_map(prompt)
        totals: dict[str, float] = {}
        if self.others:
            totals["<pad>"] = float(share[len(slots)])  # the padding column
        for position, slot in enumerate(slots):
            name = token_map.word_at(slot)
            if name not in ("<start>", "<end>", "<pad>"):
                word = next(w for w in token_map.words if slot in w.slots)
                repeats = sum(1 for w in token_map.words if w.key == word.key)
                name = word.text if repeats == 1 else f"{word.text}#{word.occurrence}"
            totals[name] = totals.get(name, 0.0) + float(share[position])
        start = {k: totals.pop(k) for k in ("<start>",) if k in totals}
        end = {k: totals.pop(k) for k in ("<end>", "<pad>") if k in totals}
        return {**start, **totals, **end}

    def self_attention(self, res: ResArg, prompt: int = 0, image: int = 0) -> torch.Tensor:
        """Mean self-attention ``[i, i]`` at one resolution (captured with ``self_attention=True``)."""
        row = self._row(prompt, image, True)
        spec = _res_selector(res)
        layers = [layer for layer in self.layers if layer.kind == "self" and spec.matches_res(layer.res)]
        if not layers or len({layer.res for layer in layers}) != 1:
            found = sorted({layer.res for layer in self.layers if layer.kind == "self"})
            raise LookupError(f"need self-attention at exactly one resolution matching {res!r}; captured: {found}")
        total = sum(layer.tensor()[row].double().mean(dim=0) for layer in layers)  # [i, i]
        return (total / sum(layer.count for layer in layers)).float()

    def block(self, name: str, prompt: int = 0, image: int = 0, *, steps: StepsArg = None, res: ResArg = None,
              sites: str | None = None, heads: Iterable[int] | None = None, cond: bool = True) -> torch.Tensor:
        """The mean of one block of joint attention over what was captured: ``[queries, keys]`` float32.

        ``name`` is ``"image->image"``, ``"text->image"``, ``"text->text"`` (kept with
        ``Capture(blocks=...)``) or ``"image->text"`` (the text map every capture keeps; its keys
        are the kept token columns, see :attr:`columns`, plus the padding column when
        :attr:`others`). Image positions are the patch grid flattened row by row (``res``), text
        positions every slot of the text sequence. The mean is over attention calls (and the
        chosen heads), like :meth:`word`; these are probabilities of the joint softmax, so a
        block's rows sum to its share of the query's attention (< 1).
        """
        if name not in JOINT_BLOCKS:
            raise ValueError(f"block must be one of {', '.join(map(repr, JOINT_BLOCKS))}, not {name!r}")
        row = self._row(prompt, image, cond)
        kept = self._cross() if name == "image->text" else [l for l in self.layers if l.kind == block_kind(name)]
        if not kept:
            raise LookupError(f"no {name} block was captured; capture it at joint sites with "
                              f"xattn.Capture(blocks=({name!r},))")
        chosen = self._matching(kept, steps, res, sites)
        sizes = sorted({layer.res for layer in chosen}, reverse=True)
        if len(sizes) != 1:
            raise LookupError(f"need {name} blocks at exactly one resolution matching res={res!r}, steps={steps!r}, "
                              f"sites={sites!r}; captured: {sorted({l.res for l in kept}, reverse=True)}")
        total = sum(layer.tensor()[row].double()[self._head_positions(layer, heads)].mean(dim=0) for layer in chosen)
        return (total / sum(layer.count for layer in chosen)).float()

    # -- lookups ---------------------------------------------------------------------------
    def _cross(self) -> list[MapLayer]:
        """The text maps: cross layers and joint layers (their image->text blocks)."""
        return [layer for layer in self.layers if layer.kind in TEXT_KINDS]

    def _check_prompt(self, prompt: int) -> None:
        if not 0 <= prompt < max(self.num_prompts, 1):
            raise IndexError(f"prompt {prompt} is out of range: this capture has {self.num_prompts} prompt(s)")

    def _row(self, prompt: int, image: int, cond: bool) -> int:
        self._check_prompt(prompt)
        if not 0 <= image < self.images_per_prompt:
            raise IndexError(f"image {image} is out of range: each prompt has {self.images_per_prompt} image(s)")
        for index, row in enumerate(self.rows):
            if row == Row(cond, prompt, image):
                return index
        raise LookupError(f"no {'conditional' if cond else 'unconditional'} row for prompt {prompt}, image {image} "
                          "was captured (unconditional rows need Capture(uncond=True))")

    def _captured(self, slots: Iterable[int]) -> bool:
        return self._column_of is None or all(slot in self._column_of for slot in slots)

    def _positions(self, word: str | int, prompt: int) -> list[int]:
        """Positions in the stored token axis of ``word``'s slots, resolved through the TokenMap."""
        if isinstance(word, int):
            slots = [word]
        else:
            slots = self.token_map(prompt).indices(word)
        if self._column_of is None:
            return slots
        missing = [slot for slot in slots if slot not in self._column_of]
        padding = list(range(len(self.columns), self._text_length(prompt)))
        if self.others and missing and missing == padding:  # every padding slot: the padding column holds their sum
            return [self._column_of[slot] for slot in slots if slot in self._column_of] + [len(self.columns)]
        if missing:
            fix = ("they are summed in its padding column: capture with Capture(slots='all') to keep them apart"
                   if self.others else "widen the selector's tokens=")
            raise TokenError(f"{word!r} (slots {missing}) was not captured; the capture kept slots {self.columns} "
                             f"({fix})")
        return [self._column_of[slot] for slot in slots]

    def _text_length(self, prompt: int) -> int:
        try:
            return self.token_map(prompt).max_length
        except LookupError:
            return len(self.columns)

    def _head_positions(self, layer: MapLayer, heads: Iterable[int] | None) -> list[int] | slice:
        if heads is None:
            return slice(None)
        if layer.heads is None:
            raise ValueError("heads were averaged at capture; pass keep_heads=True to Capture to choose heads")
        wanted = list(heads)
        missing = [h for h in wanted if h not in layer.heads]
        if missing:
            raise ValueError(f"heads {missing} were not captured at {layer.sites[0]}; kept heads: {list(layer.heads)}")
        return [layer.heads.index(h) for h in wanted]

    def _select(self, steps: StepsArg, res: ResArg, sites: str | None = None,
                exclude: str | None = None) -> list[MapLayer]:
        """The cross layers a word map adds up; the default exclusion gives way to ``sites=`` and where it
        would leave nothing (``res=`` of the mid block's size alone, a capture of the mid block alone)."""
        default = exclude == DEFAULT_EXCLUDE
        if exclude is not None and not (default and sites is not None):
            chosen = self._matching(self._without(self._cross(), exclude), steps, res, sites)
            if chosen or not default:
                return self._found(chosen, steps, res, sites)
        return self._found(self._matching(self._cross(), steps, res, sites), steps, res, sites)

    def _found(self, chosen: list[MapLayer], steps: StepsArg, res: ResArg, sites: str | None) -> list[MapLayer]:
        if not chosen:
            raise LookupError(f"no captured cross-attention matches steps={steps!r}, res={res!r}, sites={sites!r}; "
                              f"captured resolutions {self.resolutions}, steps {self.steps}")
        return chosen

    def _matching(self, layers: list[MapLayer], steps: StepsArg, res: ResArg, sites: str | None) -> list[MapLayer]:
        spec = _res_selector(res)
        wanted = None if steps is None else self._step_set(steps)
        chosen = []
        for layer in layers:
            if not spec.matches_res(layer.res):
                continue
            if sites is not None:
                matching = [fnmatch.fnmatchcase(site, sites) for site in layer.sites]
                if not any(matching):
                    continue
                if not all(matching):
                    raise ValueError(f"sites={sites!r} splits the summed map {layer.describe()}; capture with "
                                     "per_step=True or keep_heads=True to keep each site apart")
            if wanted is not None and layer.steps:
                inside = set(layer.steps) & wanted
                if not inside:
                    continue
                if len(inside) != len(layer.steps):
                    raise ValueError(
                        f"steps {sorted(wanted)} split the aggregated map {layer.describe()}; "
                        "capture with per_step=True to choose steps"
                    )
            chosen.append(layer)
        return chosen

    def _without(self, layers: list[MapLayer], exclude: str) -> list[MapLayer]:
        """The layers without the sites matching ``exclude``.

        The default (the mid block) keeps whole a sum that mixes mid-block and
        other sites (maps saved before the mid block was summed apart); an
        explicit glob is strict.
        """
        kept = []
        for layer in layers:
            matching = [fnmatch.fnmatchcase(site, exclude) for site in layer.sites]
            if all(matching):
                continue
            if any(matching) and exclude != DEFAULT_EXCLUDE:
                raise ValueError(f"exclude={exclude!r} splits the summed map {layer.describe()}; capture with "
                                 "per_step=True or keep_heads=True to keep each site apart")
            kept.append(layer)
        return kept

    def _step_set(self, steps: StepsArg) -> set[int]:
        if isinstance(steps, str):
            spans = Selector.from_dict({"steps": steps}).steps
            total = self.num_steps or (max(self.steps, default=0) + 1)
            return {s for s in range(total) if any(span.contains(s, total) for span in spans)}
        if isinstance(steps, tuple) and len(steps) == 2 and all(isinstance(v, int) for v in steps):
            return set(range(steps[0], steps[1]))
        try:
            return {int(s) for s in steps}
        except (TypeError, ValueError):
            raise ValueError(f"steps must be a range like '0:10', (0, 10) or a list of step indices, not {steps!r}")

    def __repr__(self) -> str:
        return (f"WordMaps({self.num_prompts} prompt(s) x {self.images_per_prompt} image(s), "
                f"{len(self.layers)} layer(s), res {self.resolutions}, image {self.image_size})")


def _res_selector(res: ResArg) -> Selector:
    if res is None:
        return Selector()
    if isinstance(res, tuple):
        res = f"{res[0]}x{res[1]}"
    try:
        return Selector.from_dict({"res": str(res)})
    except SelectorError as error:
        raise ValueError(f"res={res!r}: {error}") from None


def _min_max(heat: torch.Tensor) -> torch.Tensor:
    low, high = heat.min(), heat.max()
    if high <= low:
        return torch.zeros_like(heat)
    return (heat - low) / (high - low)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = DEFAULT_UPSAMPLE) -> torch.Tensor:
    """``[n, h, w]`` maps at ``size``: ``[n, H, W]`` (half-pixel centres; bicubic may undershoot 0 at edges)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {', '.join(map(repr, UPSAMPLE_MODES))}, not {mode!r}")
    grid = maps[None]  # [1, n, h, w]
    if mode == "nearest":
        return F.interpolate(grid, size=size, mode="nearest-exact")[0]
    return F.interpolate(grid, size=size, mode=mode, align_corners=False)[0]

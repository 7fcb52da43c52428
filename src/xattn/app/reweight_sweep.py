"""Reweight grids: one word at several weights, in one or more modes, over several seeds.

The CLI's ``xattn reweight --word red --weights 0,1,2 --modes scale,bias
--seeds 0:4`` calls :func:`run_sweep`;
:func:`sweep_sheet` lays the result out as a labelled grid (rows weights,
columns mode x seed). A weight a mode rejects (``bias`` with ``w <= 0``, or
``embedding`` on an encoder whose rows average to 0) becomes a skipped cell
with its reason, never a silent gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image

from .. import validate
from ..grid import labelled_grid
from ..prompt_syntax import parse_prompt
from ..reweight import Reweight
from ..reweight.modes import ReweightError, mode_named
from ..session import hooks
from ..tokens import TokenMap

# (clean prompt, first seed, image count) -> images seeded first, first + 1, ...
GenerateFn = Callable[[str, int, int], list]


@dataclass
class Cell:
    """One image of a sweep, or why there is none."""

    mode: str
    weight: float | None  # None: the prompt's own weights, no sweep word
    seed: int
    image: Image.Image | None = None
    skipped: str | None = None  # the reason, when the mode rejects the weight
    reweight: dict | None = None  # Reweight.to_dict() of the controller that made it

    @property
    def file_name(self) -> str:
        weight = "prompt" if self.weight is None else f"w{self.weight:g}"
        return f"{self.mode}_{weight}_seed{self.seed}.png"


def parse_seeds(text: str) -> list[int]:
    """``"0:4"`` -> [0, 1, 2, 3]; ``"3,7"`` -> [3, 7]; ``"5"`` -> [5] (:func:`xattn.validate.seed_list`)."""
    try:
        return validate.seed_list(text, "--seeds")
    except validate.OptionError as error:
        raise ReweightError(str(error)) from None


def parse_weights(text: str) -> list[float]:
    """``"-1,0,0.5,1,2,4"`` -> floats; names the item that is not a number finite in float32."""
    try:
        return validate.weight_list(text, "--weights")
    except validate.OptionError as error:
        raise ReweightError(str(error)) from None


def _runs_of_consecutive(seeds: Sequence[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 7] -> [(0, 3), (7, 1)]: (first seed, count), to batch images in one call."""
    runs: list[tuple[int, int]] = []
    for seed in seeds:
        if runs and runs[-1][0] + runs[-1][1] == seed:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((seed, 1))
    return runs


def run_sweep(pipe, prompt: str, generate: GenerateFn, *, word: str | None = None,
              weights: Sequence[float] | None = None, modes: Sequence[str] = ("scale",),
              seeds: Sequence[int] = (0,), guide=None, **options) -> list[Cell]:
    """Generate every (mode, weight, seed) cell.

    Args:
        pipe: the pipeline ``generate`` runs (the session is opened on it).
        prompt: a weighted prompt (``"a (red:2) circle"``); its weights apply in every cell.
        generate: ``(clean_prompt, first_seed, count) -> images``.
        word: the word to sweep (``"red"``, ``"red#2"``); ``None``: just the prompt's weights.
        weights: the weights of ``word``, one row each.
        modes: reweight modes, compared side by side.
        seeds: one column per seed and mode.
        guide: a :class:`~xattn.guide.Guide` that steers every cell (it reads the model's own maps, the
            reweighting does not enter its pass; each step then denoises reweighted), or None.
        **options: further :class:`Reweight` options (``steps``, ``selector``, ``rows``, ``syntax``).
    """
    if (word is None) != (weights is None):
        raise ReweightError("give --word and --weights together (the word to sweep and its weights)")
    for mode in modes:
        mode_named(mode)
    if word is not None:
        _check_word(pipe, parse_prompt(prompt, syntax=options.get("syntax", "a1111")).text, word)
    rows: list[float | None] = list(weights) if weights is not None else [None]
    cells: list[Cell] = []
    for mode in modes:
        for weight in rows:
            try:
                extra = None if word is None else {word: weight}
                controller = Reweight.from_prompt(prompt, mode=mode, weights=extra, **options)
            except ReweightError as error:
                if weight is None:
                    raise
                cells.extend(Cell(mode, weight, seed, skipped=str(error)) for seed in seeds)
                continue
            made: dict[int, Image.Image] = {}
            try:
                with hooks(pipe, controller, *([guide] if guide is not None else [])):
                    for first, count in _runs_of_consecutive(seeds):
                        for index, image in enumerate(generate(controller.prompt, first, count)):
                            made[first + index] = image
            except ReweightError as error:  # found while running, e.g. embedding mode on a mean-0 encoder
                if weight is None:
                    raise
                cells.extend(Cell(mode, weight, seed, skipped=str(error)) for seed in seeds)
                continue
            cells.extend(Cell(mode, weight, seed, made[seed], reweight=controller.to_dict()) for seed in seeds)
    if all(cell.skipped for cell in cells):
        raise ReweightError(f"no cell of the sweep could be made: {cells[0].skipped}")
    return cells


def _check_word(pipe, clean_prompt: str, word: str) -> None:
    """Fail before generating anything when ``word`` is not in the prompt (TokenError lists its words)."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is not None:
        TokenMap(tokenizer, clean_prompt).indices(word)


def sweep_sheet(cells: Sequence[Cell], *, title: str | None = None, min_cell: int = 128) -> Image.Image:
    """Rows: weights (in sweep order); columns: mode x seed. Small images are upscaled to ``min_cell``."""
    weights = list(dict.fromkeys(cell.weight for cell in cells))
    columns = list(dict.fromkeys((cell.mode, cell.seed) for cell in cells))
    by_key = {(cell.weight, cell.mode, cell.seed): cell for cell in cells}
    grid = [[by_key[(weight, mode, seed)].image for mode, seed in columns] for weight in weights]
    several_modes = len({mode for mode, _ in columns}) > 1
    col_labels = [f"{mode} s{seed}" if several_modes else f"seed {seed}" for mode, seed in columns]
    row_labels = ["prompt" if weight is None else f"w={weight:g}" for weight in weights]
    sizes = [cell.image.size for cell in cells if cell.image is not None]
    scale = max(1, min_cell // min(sizes[0])) if sizes else 1
    return labelled_grid(grid, row_labels, col_labels, title=title, cell_scale=scale)


__all__ = ["Cell", "parse_seeds", "parse_weights", "run_sweep", "sweep_sheet"]

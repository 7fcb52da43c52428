"""``xattn reweight``: generate with word weights, or sweep one word's weight into a labelled grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from ..app.reweight_sweep import parse_seeds, parse_weights, run_sweep, sweep_sheet
from ..reweight import MODES, Reweight, ReweightError
from ..reweight.modes import mode_named
from . import common

GRID = "grid.png"


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        'xattn reweight "a (red:2) circle and a blue square"',
        'xattn reweight "a red square and a blue circle" --word red --weights -1,0,0.5,1,2,4 --mode scale --seeds 0:4',
        'xattn reweight "a red square and a blue circle" --word red --weights 0,0.5,1,2 --modes scale,bias,embedding',
        'xattn reweight "a red circle" --word red --weights 0,1 --window 0:0.3 --select "res=16"',
    ))
    def reweight(
        prompt: Annotated[str, typer.Argument(show_default=False,
                                              help="Prompt; (word:1.5), [word], word+ set weights (A1111/compel).")],
        word: Annotated[Optional[str], typer.Option(help="Word to sweep: red, red#2 (2nd occurrence), 'red circle'.")] = None,
        weights: Annotated[Optional[str], typer.Option(help="Weights of --word, one grid row each: -1,0,0.5,1,2,4.")] = None,
        mode: Annotated[Optional[str], typer.Option(
            help=f"What a weight means: {'; '.join(f'{m.name}: {m.meaning}' for m in MODES.values())}.",
            show_default="scale")] = None,
        modes: Annotated[Optional[str], typer.Option(help="Several modes side by side: scale,bias,embedding.")] = None,
        seeds: Annotated[Optional[str], typer.Option(help="Seeds, one column each: 0:4 or 0,3,7.",
                                                     show_default="--seed")] = None,
        window: Annotated[Optional[str], typer.Option(help="Steps where weights apply: 0:0.3 (fractions) or 2:10.",
                                                      show_default="every step")] = None,
        select: Annotated[Optional[str], typer.Option(help="Which cross-attention sites: res=16, sites=up_blocks.*.",
                                                      show_default="every cross site")] = None,
        all_rows: Annotated[bool, typer.Option("--all-rows", help="Weight the unconditional rows too.")] = False,
        negative_prompt: common.NegativePrompt = None, syntax: common.Syntax = "a1111",
        model: common.Model = None, config_folder: common.ConfigFolder = None, lora_dir: common.LoraDir = None,
        device: common.Device = None, dtype: common.Dtype = None,
        scheduler: common.Scheduler = None, seed: common.Seed = None, steps: common.Steps = None,
        guidance: common.Guidance = None, size: common.Size = None, max_pixels: common.MaxPixels = None,
        threads: common.Threads = None, out: common.Out = None, overwrite_failed: common.OverwriteFailed = False,
        config: common.Config = None, progress: common.Progress = True,
        controlnet: common.ControlNet = None, control_image: common.ControlImage = None,
        control_scale: common.ControlScale = None, ip_adapter: common.IPAdapter = None,
        ip_image: common.IPImage = None, ip_scale: common.IPScale = None,
    ):
        """Reweight words at the attention level; with --word and --weights, write a labelled grid."""
        options = dict(locals())
        with common.user_errors():
            # Read and check every reweighting option (command line > --config) before the model loads.
            settings = common.resolve(options)[0]
            sweep = _Sweep.from_settings(settings)
            common.runner.read_adapters(settings)  # --controlnet / --ip-adapter checked before loading
            with common.start("reweight", options, slug=sweep.prompt) as run:
                _reweight(run, sweep)


def _reweight(run: common.Run, sweep: "_Sweep") -> None:
    """Generate every cell, save the images and the grid, finish the run."""
    extra = common.attach_adapters(run)  # --controlnet / --ip-adapter: every cell gets the same images
    seed_list = sweep.seeds if sweep.seeds is not None else [int(run.settings["seed"])]

    def generate(clean_prompt: str, first: int, count: int) -> list:
        return run.generate(clean_prompt, seed=first, num_images_per_prompt=count, literal=True, **extra)

    cells = run_sweep(run.pipe, sweep.prompt, generate, word=sweep.word, weights=sweep.weights,
                      modes=sweep.modes, seeds=seed_list, **sweep.reweight_options)
    for cell in cells:
        if cell.image is not None:
            run.save_png(cell.image, cell.file_name, prompt=cell.reweight["prompt"], seed=cell.seed,
                         xattn={"reweight": cell.reweight})
    run.save_image(sweep_sheet(cells, title=sweep.title), GRID)
    run.finish(grid=GRID, reweight={**sweep.describe(), "seeds": seed_list, "cells": [
        {"mode": c.mode, "weight": c.weight, "seed": c.seed,
         "file": None if c.image is None else c.file_name, "skipped": c.skipped} for c in cells]})
    skipped = [c for c in cells if c.skipped]
    if skipped:
        typer.echo(f"note: {len(skipped)} cell(s) left grey: {skipped[0].skipped}", err=True)


@dataclass(frozen=True)
class _Sweep:
    """The reweighting options of one run, read and checked from the merged settings."""

    prompt: str
    word: str | None
    weights: list[float] | None
    modes: list[str]
    seeds: list[int] | None  # None: the run's --seed
    window: str | None
    select: str | None
    rows: str
    syntax: str = "a1111"

    @classmethod
    def from_settings(cls, settings: dict) -> "_Sweep":
        """The sweep the merged settings describe; an option given empty is refused, never read as its default."""
        if settings.get("mode") is not None and settings.get("modes") is not None:
            raise ReweightError("give --mode or --modes, not both")
        given = settings.get("modes") if settings.get("modes") is not None else settings.get("mode")
        modes = [m.strip() for m in (given if given is not None else "scale").split(",")]
        for name in modes:
            mode_named(name)
        sweep = cls(
            prompt=settings["prompt"], word=settings.get("word"),
            weights=parse_weights(settings["weights"]) if settings.get("weights") is not None else None,
            modes=modes, seeds=parse_seeds(settings["seeds"]) if settings.get("seeds") is not None else None,
            window=settings.get("window"), select=_select(settings),
            rows="all" if settings.get("all_rows") else "cond", syntax=settings.get("syntax") or "a1111",
        )
        if (sweep.word is None) != (sweep.weights is None):
            raise ReweightError("give --word and --weights together (the word to sweep and its weights)")
        Reweight.from_prompt(sweep.prompt, **sweep.reweight_options)  # checks the syntax, window and sites
        return sweep

    @property
    def reweight_options(self) -> dict:
        return {"steps": self.window, "selector": self.select, "rows": self.rows, "syntax": self.syntax}

    @property
    def title(self) -> str:
        if self.word is None:
            return f"{self.prompt} ({', '.join(self.modes)})"
        return f"{self.prompt}: weight of {self.word!r}, {', '.join(self.modes)}"

    def describe(self) -> dict:
        return {"prompt": self.prompt, "word": self.word, "weights": self.weights, "modes": self.modes,
                "window": self.window, "select": self.select, "rows": self.rows}


def _select(settings: dict) -> str | None:
    """``--select`` (or a config's ``sites``); blank is refused: it would silently mean every site."""
    select = settings.get("select") if settings.get("select") is not None else settings.get("sites")
    if select is not None and not str(select).strip():
        raise ReweightError("--select names cross-attention sites, e.g. res=16 or sites=up_blocks.*; got ''")
    return select

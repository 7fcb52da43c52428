"""``xattn reweight``: generate with word weights, or sweep one word's weight into a labelled grid."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..prompt_syntax import PromptSyntaxError
from ..reweight import MODES, Reweight, ReweightError
from ..reweight.modes import mode_named
from ..reweight.sweep import parse_seeds, parse_weights, run_sweep, sweep_sheet
from ..runfolder import RunFolderError, save_image_atomic
from . import common

GRID = "grid.png"


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        'xattn reweight "a (red:2) circle and a blue square"',
        'xattn reweight "a red circle and a blue square" --word red --weights -1,0,0.5,1,2,4 --mode scale --seeds 0:4',
        'xattn reweight "a red circle and a blue square" --word red --weights 0,0.5,1,2 --modes scale,bias,embedding',
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
        negative_prompt: common.NegativePrompt = None,
        model: common.Model = None, device: common.Device = None, dtype: common.Dtype = None,
        scheduler: common.Scheduler = None, seed: common.Seed = None, steps: common.Steps = None,
        guidance: common.Guidance = None, size: common.Size = None, out: common.Out = None,
        config: common.Config = None, progress: common.Progress = False,
    ):
        """Reweight words at the attention level; with --word and --weights, write a labelled grid."""
        options = dict(locals())
        with common.user_errors(ReweightError, PromptSyntaxError):
            # Every option is checked before the model loads.
            if mode is not None and modes is not None:
                raise ReweightError("give --mode or --modes, not both")
            mode_list = [m.strip() for m in (modes or mode or "scale").split(",")]
            for name in mode_list:
                mode_named(name)
            Reweight.from_prompt(prompt, steps=window, selector=select)  # the syntax, window and sites
            weight_list = parse_weights(weights) if weights is not None else None
            seed_list = parse_seeds(seeds) if seeds is not None else None
            run = common.start("reweight", options, slug=prompt)
            if seed_list is None:
                seed_list = [int(run.settings["seed"])]

            def generate(clean_prompt: str, first: int, count: int) -> list:
                return run.generate(clean_prompt, seed=first, num_images_per_prompt=count)

            cells = run_sweep(run.pipe, prompt, generate, word=word, weights=weight_list, modes=mode_list,
                              seeds=seed_list, steps=window, selector=select, rows="all" if all_rows else "cond")
            for cell in cells:
                if cell.image is not None:
                    run.save_png(cell.image, cell.file_name, prompt=cell.reweight["prompt"], seed=cell.seed,
                                 xattn={"reweight": cell.reweight})
            title = prompt if word is None else f"{prompt}: weight of {word!r}, {', '.join(mode_list)}"
            grid_path = run.folder / GRID
            if grid_path.exists():
                raise RunFolderError(f"{grid_path} exists; a run never overwrites its files")
            save_image_atomic(sweep_sheet(cells, title=title), grid_path)
            run.outputs.append(GRID)
            run.finish(grid=GRID, reweight={
                "prompt": prompt, "word": word, "weights": weight_list, "modes": mode_list, "seeds": seed_list,
                "window": window, "select": select, "rows": "all" if all_rows else "cond",
                "cells": [{"mode": c.mode, "weight": c.weight, "seed": c.seed,
                           "file": None if c.image is None else c.file_name, "skipped": c.skipped}
                          for c in cells],
            })
            skipped = [c for c in cells if c.skipped]
            if skipped:
                typer.echo(f"note: {len(skipped)} cell(s) left grey: {skipped[0].skipped}", err=True)

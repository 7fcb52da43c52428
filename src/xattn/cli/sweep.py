"""``xattn sweep CONFIG.yaml``: run a grid of jobs; resumable; scales out with accelerate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from . import common


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        "xattn sweep configs/sweep-example.yaml",
        "xattn sweep configs/sweep-example.yaml --out outputs/my-sweep   # rerun the same line to resume",
        "accelerate launch --multi_gpu --num_processes 2 -m xattn sweep configs/sweep-example.yaml",
        "accelerate launch --multi_gpu --num_processes 4 -m xattn sweep configs/sweep-example.yaml --out outputs/big",
    ))
    def sweep(
        config: Annotated[Path, typer.Argument(parser=common.given_path, show_default=False,
                                               help="Sweep YAML: settings, `job:` kind, a `grid:` and, for generate jobs, "
                                                    "`guide:` (see configs/ and docs/cli.md).")],
        out: Annotated[Path | None, typer.Option(
            parser=common.given_path, show_default="a new outputs/sweep-<time>-<name>",
            help="Run folder; an existing folder of the same sweep is resumed (finished jobs are skipped).")] = None,
        model: common.Model = None, device: common.Device = None, dtype: common.Dtype = None,
        scheduler: common.Scheduler = None, steps: common.Steps = None,
        guidance: common.Guidance = None, size: common.Size = None, max_pixels: common.MaxPixels = None,
        threads: common.Threads = None, progress: common.Progress = True,
    ):
        """Run every job of a grid (prompts x seeds x words x weights x modes x step windows).

        On a CPU-only machine `accelerate launch --multi_gpu --num_processes N` starts N CPU processes
        (over gloo); accelerate's `--cpu` launcher starts several only through MPI.
        """
        from ..app.sweep import plan_jobs, run_sweep

        with common.user_errors():
            settings, grid, kind = sweep_settings(config, {
                "model": model, "device": device, "dtype": dtype, "scheduler": scheduler, "steps": steps,
                "guidance": guidance, "size": size, "max_pixels": max_pixels, "threads": threads, "out": out,
            })
            jobs = plan_jobs(grid, kind)
            result = run_sweep(settings, jobs, out=settings.get("out"), slug=config.stem, progress=progress)
            typer.echo(f"ran {len(result.ran)} jobs here, {len(result.skipped)} were already done, "
                       f"{result.total} in the grid: {result.folder}")


def sweep_settings(config: Path, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list], str]:
    """Merge command line > sweep file > model defaults > built-in defaults; check the grid.

    Returns:
        (settings, grid, job kind).
    """
    from ..app.config import load_config, one_of, syntax_value
    from ..app.runner import model_defaults, resolve_model
    from ..app.sweep import JOB_KINDS, check_grid
    from ..validate import check_settings

    data = load_config(config, extra_keys={"job": one_of(JOB_KINDS), "grid": None, "syntax": syntax_value})
    kind = data.pop("job", "reweight" if "words" in (data.get("grid") or {}) else "generate")
    if "grid" not in data:
        raise common.ConfigError(f"{config}: key 'grid' is missing; a sweep needs grid: {{prompts: [...], seeds: [...]}}")
    grid = check_grid(data.pop("grid"), kind, source=str(config))
    if kind == "generate" and data.get("sites") is not None:
        raise common.ConfigError(f"{config}: key 'sites' has no meaning for job: generate (nothing is hooked)")
    cli = {k: v for k, v in given.items() if v is not None}
    model = cli.get("model", data.get("model"))
    defaults = {k: v for k, v in model_defaults(resolve_model(model)).items() if k in common.DEFAULTS}
    settings = check_settings({**common.DEFAULTS, **defaults, "syntax": "a1111", **data, **cli, "job": kind})
    if settings.get("out") is not None:
        settings["out"] = str(settings["out"])
    return settings, grid, kind

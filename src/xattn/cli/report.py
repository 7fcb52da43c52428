"""``xattn report``: rebuild the HTML report of a ``xattn maps`` run folder (another colormap, another file)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from PIL import Image

from ..capture.export import load_maps
from ..capture.pictures import DEFAULT_ALPHA, DEFAULT_CMAP
from ..capture.report import write_report
from ..runfolder import RunFolderError
from . import common

IMAGE_NAME = re.compile(r"image-(\d+)\.png")


def run_images(folder: Path) -> list[Image.Image]:
    """The run's ``image-<k>.png`` files in order of k."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := IMAGE_NAME.fullmatch(p.name)))
    if not found:
        raise FileNotFoundError(f"{folder} holds no image-<k>.png; pass a folder written by `xattn maps`")
    return [Image.open(path).convert("RGB") for _, path in found]


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        "xattn report outputs/maps-20260101-120000-a-red-circle --out viridis.html --cmap viridis",
    ))
    def report(
        folder: Annotated[Path, typer.Argument(show_default=False, help="A run folder written by `xattn maps`.")],
        out: Annotated[Optional[Path], typer.Option(help="The HTML file to write (must not exist).",
                                                    show_default="FOLDER/report-<cmap>.html")] = None,
        cmap: Annotated[str, typer.Option(help="A matplotlib colormap: inferno, viridis, magma, gray...")] = DEFAULT_CMAP,
        alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the map over the image.")] = DEFAULT_ALPHA,
    ):
        """Write a self-contained HTML report of a maps run: pick a word, steps and a resolution."""
        with common.user_errors(FileNotFoundError, ValueError):
            maps = load_maps(folder)
            target = out if out is not None else folder / f"report-{cmap}.html"
            if target.exists():
                raise RunFolderError(f"{target} exists; pass a new --out file")
            write_report(maps, run_images(folder), target, cmap=cmap, alpha=alpha)
            typer.echo(f"wrote {target}")

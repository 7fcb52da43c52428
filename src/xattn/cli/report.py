"""``xattn report``: rebuild the HTML report of a ``xattn maps`` run folder (another colormap, another file)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from PIL import Image

from ..app.runfolder import RunFolderError, read_manifest
from ..capture.export import load_maps
from ..capture.pictures import DEFAULT_ALPHA, DEFAULT_CMAP
from ..capture.report import write_report
from ..validate import number
from . import common

IMAGE_NAME = re.compile(r"image-(\d+)\.png")


def run_images(folder: Path) -> list[Image.Image]:
    """The run's ``image-<k>.png`` files in order of k."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := IMAGE_NAME.fullmatch(p.name)))
    if not found:
        raise RunFolderError(f"{folder} holds no image-<k>.png; pass a folder written by `xattn maps`")
    images = []
    for _, path in found:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise RunFolderError(f"{path} cannot be read as an image ({error})") from None
    return images


def read_maps(folder: Path):
    """The run's word maps; a folder that is not a maps run, or whose files were changed, is a named error."""
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is missing or not a folder; pass a run folder written by `xattn maps`")
    read_manifest(folder)  # a manifest that is not JSON is named here
    try:
        return load_maps(folder)
    except FileNotFoundError as error:
        raise RunFolderError(str(error)) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:  # a manifest edited by hand
        raise RunFolderError(f"{folder}: its maps cannot be read back ({type(error).__name__}: {error}); "
                             "rerun `xattn maps`") from None


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        "xattn report outputs/maps-20260101-120000-a-red-circle --out viridis.html --cmap viridis",
    ))
    def report(
        folder: Annotated[Path, typer.Argument(parser=common.given_path, show_default=False,
                                               help="A run folder written by `xattn maps`.")],
        out: Annotated[Optional[Path], typer.Option(parser=common.given_path,
                                                    help="The HTML file to write (must not exist).",
                                                    show_default="FOLDER/report-<cmap>.html")] = None,
        cmap: Annotated[str, typer.Option(help="A matplotlib colormap: inferno, viridis, magma, gray...")] = DEFAULT_CMAP,
        alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the map over the image.")] = DEFAULT_ALPHA,
    ):
        """Write a self-contained HTML report of a maps run: pick a word, steps and a resolution."""
        with common.user_errors():
            alpha = number(alpha, "--alpha")
            maps = read_maps(folder)
            target = out if out is not None else folder / f"report-{cmap}.html"
            if target.exists():
                raise RunFolderError(f"{target} exists; pass a new --out file")
            write_report(maps, run_images(folder), target, cmap=cmap, alpha=alpha)
            typer.echo(f"wrote {target}")

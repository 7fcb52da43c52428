"""The ``xattn`` command line: one typer app, one module per command.

Each command lives in ``xattn/cli/<name>.py`` and exposes
``register(app: typer.Typer) -> None``; this module registers them all, in
the order ``xattn --help`` lists them.
"""

from __future__ import annotations

from typing import Annotated

import typer

HELP = """See and steer how a prompt's words shape a diffusion image.

Every command runs on the embedded shapes-world model unless --model names a
pipeline folder or a cached Hub id, and writes into a new run folder under
outputs/ with a manifest.json and PNGs that carry their generation parameters.

Examples:

\b
  $ xattn generate "a red square and a blue circle" --seed 3
  $ xattn sites
  $ xattn generate --from-png outputs/generate-20260101-120000-a-red-circle/image-0.png
  $ xattn sweep configs/sweep-example.yaml
  $ accelerate launch --multi_gpu --num_processes 2 -m xattn sweep configs/sweep-example.yaml
"""

from . import edit, generate, maps, report, reweight, sites, sweep

COMMANDS = ("generate", "sites", "sweep", "maps", "reweight", "edit", "report")  # the order of `xattn --help`

app = typer.Typer(
    name="xattn", help=HELP, no_args_is_help=True, add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"xattn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print xattn's version and exit.")] = False,
) -> None:
    """Options before the command name."""


for _module in (generate, sites, sweep, maps, reweight, edit, report):
    _module.register(app)
REGISTERED = list(COMMANDS)


def main() -> None:
    """Entry point of the ``xattn`` console script and ``python -m xattn``."""
    app(prog_name="xattn")


__all__ = ["app", "main", "REGISTERED"]

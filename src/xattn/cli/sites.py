"""``xattn sites``: print the attention sites of a model as a table, or audit every denoiser class."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import typer

from ..validate import OptionError
from . import common


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples("xattn sites", "xattn sites path/to/pipeline --kind cross",
                                        "xattn sites --audit"))
    def sites(
        model_arg: Annotated[Optional[str], typer.Argument(
            metavar="[MODEL]", show_default=False,
            help="Pipeline folder or cached Hub id (default: the shapes-world model).")] = None,
        model: common.Model = None,
        kind: Annotated[Optional[Literal["cross", "self", "all"]], typer.Option(
            help="Only sites of this kind.")] = None,
        audit: Annotated[bool, typer.Option(
            "--audit", help="Instead of one model's sites: every denoiser class of the installed diffusers, "
                            "built on the meta device, and whether xattn hooks it, refuses it (and why) or "
                            "cannot build it (the table of docs/coverage.md).")] = False,
    ):
        """List every attention site (module path, kind, block, heads) of a model, and whether xattn can hook it."""
        with common.user_errors():
            if audit:
                given = [name for name, value in (("MODEL", model_arg), ("--model", model), ("--kind", kind))
                         if value is not None]
                if given:
                    raise OptionError(f"--audit checks every denoiser class of the installed diffusers, not one "
                                      f"model; drop {' and '.join(given)}")
                from ..audit import audit_all, report

                typer.echo(report(audit_all()))
                return
            from ..install import hookable
            from ..sites import format_table, sites as list_sites
            from ..app.runner import load_pipeline

            if model_arg is not None and model is not None and model_arg != model:
                raise OptionError(
                    f"two models given ({model_arg!r} and --model {model!r}); pass one")
            pipe = load_pipeline(model_arg or model, device="cpu", dtype="float32")
            listed = list_sites(pipe)
            if kind in ("cross", "self"):
                listed = [s for s in listed if s.kind == kind]
            typer.echo(format_table(listed, hookable(pipe)))

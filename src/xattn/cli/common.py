"""Options and helpers every command shares: model, device, seed, config, run folder.

How a new command uses this module (``src/xattn/cli/mycommand.py``)::

    import typer
    from xattn.cli import common

    def register(app: typer.Typer) -> None:
        @app.command(epilog=common.examples("xattn mycommand 'a red circle' --seed 3"))
        def mycommand(
            prompt: str,
            words: Annotated[str, typer.Option(help="...")] = "",
            model: common.Model = None, device: common.Device = None, dtype: common.Dtype = None,
            scheduler: common.Scheduler = None, seed: common.Seed = None, steps: common.Steps = None,
            guidance: common.Guidance = None, size: common.Size = None, out: common.Out = None,
            config: common.Config = None,
        ):
            \"\"\"One line that says what the command does.\"\"\"
            with common.user_errors():
                with common.start("mycommand", locals(), slug=prompt) as run:  # failed runs say so
                    images = run.generate(prompt)      # uses the merged seed/steps/guidance/size
                    run.save_png(images[0], "image.png", prompt=prompt, seed=run.settings["seed"])
                    run.finish()

Every option defaults to ``None`` so a ``--config`` file can fill it; what is
still unset falls back to the model's ``xattn_defaults.json``, then to
:data:`DEFAULTS`. ``common.start`` merges them (command line > config > model
defaults > built-in), loads the pipeline through :mod:`xattn.runner`, makes
the run folder and writes a first manifest. Errors a user can fix (missing
model, bad config key, existing ``--out``, unknown word, bad selector) are
printed as one ``Error:`` line with exit code 2 by :func:`user_errors`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping, Optional, Sequence

import typer

from .. import runner
from ..config import COMMON_KEYS, ConfigError, load_config
from ..pngmeta import PngMetadataError, format_parameters, png_info
from ..runfolder import (
    RunFolderError,
    Timings,
    build_manifest,
    check_out_folder,
    create_run_folder,
    save_image_atomic,
    write_manifest,
)

# Built-in fallbacks, used when neither the command line, the config nor the model set a value.
DEFAULTS: dict[str, Any] = {
    "model": None, "device": "auto", "dtype": "auto", "scheduler": None, "seed": 0,
    "steps": 25, "guidance": 5.0, "size": None, "negative_prompt": None, "sites": None, "out": None,
}

# -- typed options, shared by every command -------------------------------------------------
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default="the embedded shapes-world model",
    help="Pipeline folder, or a Hub id already in the local Hugging Face cache.")]
DeviceName = Literal[tuple(runner.DEVICES)]
DtypeName = Literal[("auto", *runner.DTYPES)]
SchedulerName = Literal[tuple(runner.SCHEDULERS)]

Device = Annotated[Optional[DeviceName], typer.Option(
    show_default="auto",
    help="Where to run: auto picks cuda, then mps, then cpu.")]
Dtype = Annotated[Optional[DtypeName], typer.Option(
    show_default="auto",
    help="Precision: auto is float16 on CUDA and float32 elsewhere.")]
Scheduler = Annotated[Optional[SchedulerName], typer.Option(
    show_default="the model's own",
    help="Sampler, mapped to a diffusers scheduler built from the model's config.")]
Seed = Annotated[Optional[int], typer.Option(min=0, show_default=str(DEFAULTS["seed"]),
                                             help="Seed of the first image; image i uses seed + i.")]
Steps = Annotated[Optional[int], typer.Option(min=1, show_default="model default or 25",
                                              help="Number of denoising steps.")]
Guidance = Annotated[Optional[float], typer.Option(show_default="model default or 5.0",
                                                   help="Classifier-free guidance scale.")]
Size = Annotated[Optional[str], typer.Option(show_default="the model's native size",
                                             help="Image size: 64 or WIDTHxHEIGHT such as 512x768.")]
NegativePrompt = Annotated[Optional[str], typer.Option("--negative-prompt", "-n", help="Negative prompt.")]
Out = Annotated[Optional[Path], typer.Option(
    show_default="a new outputs/<command>-<time>-<slug>",
    help="Output folder; must be new or empty.")]
Config = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML file of option values (see configs/); the command line wins.")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def examples(*lines: str) -> str:
    """An ``epilog`` for ``--help``: the given command lines under 'Examples'."""
    body = "\n".join(f"  $ {line}" for line in lines)
    return f"Examples:\n\n\b\n{body}"  # \b: click keeps the lines unwrapped


# -- errors a user can fix ----------------------------------------------------------------

def _user_error_types() -> tuple[type[BaseException], ...]:
    from ..selector import SelectorError
    from ..tokens import TokenError

    return (runner.ModelNotFoundError, runner.OptionError, ConfigError, RunFolderError,
            PngMetadataError, SelectorError, TokenError)


@contextmanager
def user_errors(*more: type[BaseException]) -> Iterator[None]:
    """Turn errors a user can fix into one ``Error: ...`` line on stderr and exit code 2.

    Args:
        *more: further exception types the calling command treats as user errors.
    """
    try:
        yield
    except (*_user_error_types(), *more) as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(code=2) from None


# -- settings -----------------------------------------------------------------------------

def _current_context():
    """The running command's context, or None outside a command (library use).

    Typer >= 0.20 carries its own copy of click; older Typer runs on click.
    """
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context
    return get_current_context(silent=True)


def _is_default(name: str) -> bool:
    """True when option ``name`` was not typed on the command line."""
    context = _current_context()
    if context is None:
        return False
    source = context.get_parameter_source(name)
    return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")


def _like(default: Any):
    """A config check for a command-specific option: same kind of value as its default."""
    def check(value: Any) -> Any:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError("true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("an integer")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError("a number")
            value = float(value)
        elif isinstance(default, str):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("a string")
            value = str(value)
        return value

    return check


def _config_extra_keys(options: Mapping[str, Any]) -> dict[str, Any]:
    """Command-specific keys a config may set: the command's own option names."""
    return {name: _like(value) for name, value in options.items()
            if name not in COMMON_KEYS and name not in ("config", "progress")}


def merge_settings(options: Mapping[str, Any], *, config_path: str | Path | None = None,
                   model_defaults: Mapping[str, Any] | None = None,
                   pinned: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge, first match wins: typed options, ``pinned``, config file, model defaults,
    the options' own defaults, :data:`DEFAULTS`.

    An option counts as typed when it is not ``None`` and did not come from its
    default; so a config value beats ``--images``'s default of 1 but not ``--images 1``.

    Args:
        options: the command's parameters (``locals()`` of the command function).
        config_path: the ``--config`` file, if any.
        model_defaults: the model's ``xattn_defaults.json`` content.
        pinned: values that beat the config but not typed options (a PNG's parameters).
    """
    typed = {k: v for k, v in options.items() if k != "config" and v is not None and not _is_default(k)}
    own_defaults = {k: v for k, v in options.items() if k != "config" and k not in typed}
    from_file = load_config(config_path, extra_keys=_config_extra_keys(options)) if config_path else {}
    known_defaults = {k: v for k, v in (model_defaults or {}).items() if k in DEFAULTS}
    # An option's own default (e.g. --images 1) only fills what nothing else set.
    own_defaults = {k: v for k, v in own_defaults.items() if v is not None or k not in DEFAULTS}
    return {**DEFAULTS, **own_defaults, **known_defaults, **from_file, **dict(pinned or {}), **typed}



# -- a run ------------------------------------------------------------------------------

@dataclass
class Run:
    """A command's run: merged settings, the loaded pipeline, its folder and timings."""

    command: str
    settings: dict[str, Any]
    pipe: Any
    folder: Path
    timings: Timings = field(default_factory=Timings)
    outputs: list[str] = field(default_factory=list)

    @property
    def model_identity(self) -> dict[str, Any]:
        return dict(getattr(self.pipe, "xattn_identity", {}))

    def generate(self, prompts: str | Sequence[str], **overrides: Any) -> list:
        """Generate with the run's seed, steps, guidance, size and negative prompt.

        Args:
            prompts: one prompt or a list.
            **overrides: ``seed=``, ``steps=``... for this call, or pipeline kwargs.
        """
        s = {k: self.settings.get(k) for k in ("seed", "steps", "guidance", "size")}
        s.update({k: overrides.pop(k) for k in list(overrides) if k in s})
        if self.settings.get("negative_prompt") and "negative_prompt" not in overrides:
            count = 1 if isinstance(prompts, str) else len(prompts)
            overrides["negative_prompt"] = [self.settings["negative_prompt"]] * count
        with self.timings.phase("generate"):
            return runner.generate(self.pipe, prompts, **s, **overrides)

    def parameters_text(self, image, *, prompt: str, seed: int, xattn: Mapping[str, Any] | None = None) -> str:
        """A1111 ``parameters`` text for an image of this run."""
        scheduler = self.settings.get("scheduler") or runner.scheduler_name(self.pipe.scheduler)
        spec = runner.SCHEDULERS.get(scheduler) if scheduler else None
        identity = self.model_identity
        own = {"command": self.command, "model": self.settings.get("model"), "scheduler": scheduler,
               "dtype": self.settings.get("dtype"), **(xattn or {})}
        if identity.get("revision"):
            own["revision"] = identity["revision"]
        return format_parameters(
            prompt=prompt, negative_prompt=self.settings.get("negative_prompt"),
            steps=self.settings["steps"], sampler=spec.a1111 if spec else type(self.pipe.scheduler).__name__,
            cfg_scale=self.settings["guidance"], seed=seed, width=image.width, height=image.height,
            model=identity.get("model"), xattn=own,
        )

    def save_png(self, image, name: str, *, prompt: str, seed: int, xattn: Mapping[str, Any] | None = None) -> Path:
        """Save ``image`` as ``name`` in the run folder, with its ``parameters`` chunk.

        Args:
            image: a PIL image from :meth:`generate`.
            name: file name inside the run folder.
            prompt: the prompt that made it.
            seed: the image's own seed.
            xattn: command-specific settings to record (words, weights...).
        """
        path = self.folder / name
        if path.exists():
            raise RunFolderError(f"{path} exists; a run never overwrites its files")
        text = self.parameters_text(image, prompt=prompt, seed=seed, xattn=xattn)
        save_image_atomic(image, path, pnginfo=png_info(text))
        self.outputs.append(name)
        return path

    def manifest(self, status: str, **extra: Any) -> dict[str, Any]:
        return build_manifest(self.command, _jsonable(self.settings), model=self.model_identity,
                              timings=self.timings.as_dict(), status=status,
                              extra={"outputs": list(self.outputs), **extra})

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Used as ``with common.start(...) as run:``, a run that raises is marked ``failed``."""
        if exc is not None:
            write_manifest(self.folder, self.manifest("failed", error=f"{type(exc).__name__}: {exc}"))

    def finish(self, **extra: Any) -> Path:
        """Write the final manifest (status ``finished``) and print the folder."""
        path = write_manifest(self.folder, self.manifest("finished", **extra))
        typer.echo(f"wrote {self.folder}")
        return path


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}


def load(settings: Mapping[str, Any], *, device: str | None = None):
    """Load the pipeline the merged ``settings`` name.

    Args:
        settings: merged settings (``model``, ``device``, ``dtype``, ``scheduler``, ``progress``).
        device: overrides ``settings["device"]``.
    """
    return runner.load_pipeline(
        settings.get("model"), device=device or settings.get("device") or "auto",
        dtype=settings.get("dtype") or "auto", scheduler=settings.get("scheduler"),
        progress=bool(settings.get("progress", False)),
    )


def start(command: str, options: Mapping[str, Any], *, slug: str = "", resume: bool = False,
          device: str | None = None, pinned: Mapping[str, Any] | None = None) -> Run:
    """Merge settings, load the pipeline, make the run folder, write a first manifest.

    Args:
        command: the command's name (first part of the default folder name).
        options: the command's parameters, usually ``locals()``.
        slug: words for the folder name (the prompt, the config's name).
        resume: allow ``--out`` to be an existing folder (sweeps).
        device: override the device (e.g. accelerate's process device).
        pinned: values above the config and below typed options (see :func:`merge_settings`).
    """
    options = dict(options)
    config_path = options.get("config")
    preliminary = merge_settings(options, config_path=config_path, pinned=pinned)
    model_path = runner.resolve_model(preliminary.get("model"))  # fails fast, before any folder is made
    settings = merge_settings(options, config_path=config_path, model_defaults=runner.model_defaults(model_path),
                              pinned=pinned)
    if settings.get("size") is not None:
        width, height = runner.parse_size(settings["size"])
        settings["size"] = f"{width}x{height}"
    folder_kwargs = {"slug": slug, "out": settings.get("out"), "resume": resume}
    if folder_kwargs["out"] is not None:
        check_out_folder(folder_kwargs["out"], resume=resume)  # before the slow load, so it fails at once
    timings = Timings()
    with timings.phase("load"):
        pipe = load(settings, device=device)
    folder = create_run_folder(command, **folder_kwargs)
    run = Run(command, settings, pipe, folder, timings)
    write_manifest(folder, run.manifest("running"))
    return run

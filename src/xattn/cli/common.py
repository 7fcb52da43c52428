"""What every command shares: merged settings, errors a user can fix, and a run with its folder.

How a command uses this module (``src/xattn/cli/mycommand.py``)::

    def register(app: typer.Typer) -> None:
        @app.command(epilog=common.examples("xattn mycommand 'a red circle' --seed 3"))
        def mycommand(prompt: str, model: common.Model = None, seed: common.Seed = None, ...):
            \"\"\"One line that says what the command does.\"\"\"
            with common.user_errors(), common.start("mycommand", locals(), slug=prompt) as run:
                images = run.generate(prompt)      # the merged seed/steps/guidance/size
                run.save_png(images[0], "image.png", prompt=prompt, seed=run.settings["seed"])
                run.finish()

:func:`start` merges the settings (command line > config > model defaults >
built-in), checks every number (:mod:`xattn.validate`), chooses the thread
count and loads the pipeline. The run folder is made only when the run first
writes, so a run refused before that leaves nothing behind; a run that fails
or is interrupted after it marks its manifest ``failed``, and the next run
with the same ``--out`` reuses the folder.
"""

from __future__ import annotations

import warnings

import errno
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import typer

from ..app import runner
from ..app.config import COMMON_KEYS, ConfigError, load_config
from ..app.pngmeta import image_parameters, png_info
from ..app.runfolder import RunFolderError, Timings, build_manifest, check_out_folder, create_run_folder, write_manifest
from ..app.threads import apply_threads, choose_threads
from ..errors import XattnError
from ..files import save_image_atomic
from ..validate import check_settings
from .options import *  # noqa: F401,F403 - the shared option types: common.Seed, common.Size...
from .options import examples  # noqa: F401

# Built-in fallbacks, used when neither the command line, the config nor the model set a value.
DEFAULTS: dict[str, Any] = {
    "model": None, "device": "auto", "dtype": "auto", "scheduler": None, "seed": 0, "steps": 25,
    "guidance": 5.0, "size": None, "negative_prompt": None, "sites": None, "out": None, "threads": None,
    "max_pixels": None,
}
# Parameters that are not settings a config file may hold (they are typed on the command line).
NOT_CONFIG = ("config", "prompt", "source", "target", "from_png", "folder", "model_arg",
              "excite", "bind", "box", "focus", "focus_radius", "guide_steps", "guide_step_size",
              "guide_refine")  # a config's guidance is its `guide:`

# -- errors a user can fix ----------------------------------------------------------------

# OS errors a user causes with a path: a read-only or full disk, no permission, a file where a folder goes.
USER_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC,
                         errno.EDQUOT, errno.ENAMETOOLONG, errno.EEXIST})


@contextmanager
def user_errors(*more: type[BaseException]) -> Iterator[None]:
    """Turn errors a user can fix into one ``Error: ...`` line on stderr and exit code 2.

    Those are every :class:`~xattn.errors.XattnError` and the OS errors of
    :data:`USER_ERRNOS` on a named path; anything else is a bug and keeps its traceback.

    Args:
        *more: further exception types the calling command treats as user errors.
    """
    _NOTED.clear()
    try:
        yield
    except BaseException as error:
        for run in reversed(_ACTIVE):  # a run started in this block and not left through its `with`
            run.__exit__(type(error), error, error.__traceback__)
        if isinstance(error, (XattnError, *more)):
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(code=2) from None
        if isinstance(error, OSError) and error.errno in USER_ERRNOS and error.filename:
            typer.echo(f"Error: {error.filename}: {error.strerror}", err=True)
            raise typer.Exit(code=2) from None
        raise
    finally:
        _ACTIVE.clear()
        _NOTED.clear()


# Runs started and not yet finished or failed, so that user_errors can mark them failed.
_ACTIVE: list["Run"] = []
# Notes already printed by this command (a command that resolves its settings twice says each once).
_NOTED: set[str] = set()


def _note(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        typer.echo(message, err=True)


# -- settings -----------------------------------------------------------------------------

def _current_context():
    """The running command's context, or None outside a command (library use)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context
    return get_current_context(silent=True)


def command_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Only the command's own parameters out of ``locals()`` (not names it imported)."""
    context = _current_context()
    if context is not None and context.command is not None:
        names = {param.name for param in context.command.params}
        return {k: v for k, v in options.items() if k in names}
    return {k: v for k, v in options.items() if v is None or isinstance(v, (str, int, float, bool, list, tuple, Path))}


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
        elif isinstance(default, (int, float)):
            from ..validate import integer, number

            return integer(value, "value") if isinstance(default, int) else number(value, "value")
        elif isinstance(default, str):
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError("a string")
            return str(value)
        return value

    return check


def _config_keys(options: Mapping[str, Any], unused: Sequence[str]) -> dict[str, Any]:
    """Keys a config may set for this command: the common ones and the command's own option names."""
    own = {name: _like(value) for name, value in options.items()
           if name not in COMMON_KEYS and name not in NOT_CONFIG and name != "progress"}
    own["progress"] = _like(True)
    return {**own, **{name: None for name in unused}}


def merge_settings(options: Mapping[str, Any], *, config_path: str | Path | None = None,
                   model_defaults: Mapping[str, Any] | None = None, pinned: Mapping[str, Any] | None = None,
                   unused: Sequence[str] = (), guided: bool = False) -> dict[str, Any]:
    """Merge, first match wins: typed options, ``pinned``, config file, model defaults,
    the options' own defaults, :data:`DEFAULTS`.

    An option counts as typed when it is not ``None`` and did not come from its
    default; so a config value beats ``--images``'s default of 1 but not ``--images 1``.

    Args:
        options: the command's parameters (``locals()`` of the command function).
        config_path: the ``--config`` file, if any.
        model_defaults: the model's ``xattn_defaults.json`` content.
        pinned: values that beat the config but not typed options (a PNG's parameters).
        unused: common keys that mean nothing to this command (``sites`` for ``generate``): a preset
            may hold them for other commands, so they are dropped with a note, never recorded.
        guided: the command guides sampling, so it keeps the config's ``guide:`` (checked, as
            :func:`xattn.app.config.guide_value` records it); other commands drop it with a note.
    """
    options = command_options(options)
    typed = {k: v for k, v in options.items() if k != "config" and v is not None and not _is_default(k)}
    own_defaults = {k: v for k, v in options.items() if k != "config" and k not in typed}
    from_file = load_config(config_path, extra_keys=_config_keys(options, unused)) if config_path else {}
    for key in (*unused, *(() if guided else ("guide",))):
        if from_file.pop(key, None) is not None:
            _note(f"note: {config_path}: key {key!r} is for other commands; this one does not use it")
    known_defaults = {k: v for k, v in (model_defaults or {}).items() if k in DEFAULTS}
    own_defaults = {k: v for k, v in own_defaults.items() if v is not None or k not in DEFAULTS}
    return {**DEFAULTS, **own_defaults, **known_defaults, **from_file, **dict(pinned or {}), **typed}


# -- a run ------------------------------------------------------------------------------

@dataclass(eq=False)
class Run:
    """A command's run: merged settings, the loaded pipeline, timings, and its folder once it writes.

    Used as ``with common.start(...) as run:``; a run that raises (or is
    interrupted) after its folder exists marks the manifest ``failed`` with the error.
    """

    command: str
    settings: dict[str, Any]
    pipe: Any
    slug: str = ""
    timings: Timings = field(default_factory=Timings)
    outputs: list[str] = field(default_factory=list)
    loras: list[dict] = field(default_factory=list)  # <lora:...> tags loaded from --lora-dir
    _folder: Path | None = None

    @property
    def folder(self) -> Path:
        """The run folder, made (with a ``running`` manifest) the first time the run writes."""
        if self._folder is None:
            self._folder = create_run_folder(self.command, slug=self.slug, out=self.settings.get("out"),
                                             overwrite_failed=bool(self.settings.get("overwrite_failed")))
            write_manifest(self._folder, self.manifest("running"))
        return self._folder

    @property
    def syntax(self) -> str:
        """The dialect the run's prompts are written in (``--syntax``; ``a1111`` for commands without it)."""
        return self.settings.get("syntax") or "a1111"

    def hook_names(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> dict:
        """``xattn.hooks`` arguments naming the rows of a :meth:`generate` call of weighted or long prompts."""
        from ..prompts.pipeline import hook_names

        return hook_names(self.pipe, list(prompts), negative_prompts, syntax=self.syntax)

    @property
    def model_identity(self) -> dict[str, Any]:
        return dict(getattr(self.pipe, "xattn_identity", {}))

    def generate(self, prompts: str | Sequence[str], **overrides: Any) -> list:
        """Generate with the run's seed, steps, guidance, size and negative prompt.

        Args:
            prompts: one prompt or a list, written in the run's ``syntax`` (A1111's unless ``--syntax``).
            **overrides: ``seed=``, ``steps=``... for this call, or pipeline kwargs; ``literal=True``
                when ``prompts`` are already clean text (a weighted prompt's ``Reweight.prompt``).
        """
        literal = bool(overrides.pop("literal", False))
        s = {k: self.settings.get(k) for k in ("seed", "steps", "guidance", "size")}
        s.update({k: overrides.pop(k) for k in list(overrides) if k in s})
        if self.settings.get("negative_prompt") and "negative_prompt" not in overrides:
            count = 1 if isinstance(prompts, str) else len(prompts)
            overrides["negative_prompt"] = [self.settings["negative_prompt"]] * count
        with self.timings.phase("generate"):
            listed = [prompts] if isinstance(prompts, str) else list(prompts)
            self._loras(listed)
            if "prompt_embeds" not in overrides:  # A1111 syntax and long prompts, positive and negative
                from ..prompts.pipeline import prompt_kwargs

                with warnings.catch_warnings():
                    if self.settings.get("lora_dir") is not None:  # the tags are loaded, not just removed
                        warnings.filterwarnings("ignore", message=".*<lora:")
                    overrides.update(prompt_kwargs(self.pipe, listed, overrides.pop("negative_prompt", None),
                                                   syntax=self.syntax, literal=literal))
                overrides.pop("prompt", None)
            return runner.generate(self.pipe, prompts, **s, **overrides)

    def _loras(self, prompts: list[str]) -> None:
        """``<lora:name:weight>`` tags: loaded from ``--lora-dir`` and recorded in the manifest."""
        applied = runner.apply_loras(self.pipe, prompts, self.settings.get("lora_dir"))
        if applied:
            self.loras = applied

    def new_path(self, name: str) -> Path:
        """``folder / name``, listed among the outputs; an existing file is never overwritten."""
        path = self.folder / name
        if path.exists():
            raise RunFolderError(f"{path} exists; a run never overwrites its files")
        self.outputs.append(name)  # listed before it is written, so a failed run's reuse can remove it
        return path

    def save_image(self, picture, name: str) -> Path:
        """Save a picture (grid, sheet) as ``name`` in the run folder."""
        return save_image_atomic(picture, self.new_path(name))

    def save_png(self, image, name: str, *, prompt: str, seed: int, xattn: Mapping[str, Any] | None = None) -> Path:
        """Save ``image`` as ``name`` in the run folder, with its ``parameters`` chunk.

        Args:
            image: a PIL image from :meth:`generate`.
            name: file name inside the run folder.
            prompt: the prompt that made it.
            seed: the image's own seed.
            xattn: command-specific settings to record (words, weights...).
        """
        text = image_parameters(self.pipe, self.settings, command=self.command, prompt=prompt, seed=seed,
                                image=image, own=dict(xattn or {}))
        return save_image_atomic(image, self.new_path(name), pnginfo=png_info(text))

    def manifest(self, status: str, **extra: Any) -> dict[str, Any]:
        return build_manifest(self.command, _jsonable(self.settings), model=self.model_identity,
                              timings=self.timings.as_dict(), status=status,
                              extra={"outputs": list(self.outputs), **({"loras": self.loras} if self.loras else {}),
                                     **extra})

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if exc is None or self._folder is None:
            return
        error = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        try:
            write_manifest(self._folder, self.manifest("failed", error=error))
        except OSError:  # the disk that failed the run may refuse the manifest too
            return
        typer.echo(f"note: {self._folder} is marked failed; the same --out may be passed again", err=True)

    def finish(self, **extra: Any) -> Path:
        """Write the final manifest (status ``finished``) and print the folder."""
        path = write_manifest(self.folder, self.manifest("finished", **extra))
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        typer.echo(f"wrote {self.folder}")
        return path


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}


def load(settings: Mapping[str, Any], *, device: str | None = None):
    """Load the pipeline the merged ``settings`` name (``model``, ``device``, ``dtype``, ``scheduler``, ``progress``)."""
    return runner.load_pipeline(
        settings.get("model"), device=device or settings.get("device") or "auto",
        dtype=settings.get("dtype") or "auto", scheduler=settings.get("scheduler"),
        progress=bool(settings.get("progress", False)), config_folder=settings.get("config_folder"),
    )


def resolve(command_options_: Mapping[str, Any], *, pinned: Mapping[str, Any] | None = None,
            unused: Sequence[str] = (), guided: bool = False) -> tuple[dict[str, Any], Path]:
    """The merged, checked settings of a command and its model's folder, before anything loads."""
    options = command_options(command_options_)
    config_path = options.get("config")
    preliminary = merge_settings(options, config_path=config_path, pinned=pinned, guided=True)  # for the model
    model_path = runner.resolve_model(preliminary.get("model"))  # fails fast, before any folder is made
    settings = merge_settings(options, config_path=config_path, model_defaults=runner.model_defaults(model_path),
                              pinned=pinned, unused=unused, guided=guided)
    return check_settings(settings), model_path


def start(command: str, options: Mapping[str, Any], *, slug: str = "", device: str | None = None,
          pinned: Mapping[str, Any] | None = None, unused: Sequence[str] = (), guided: bool = False) -> Run:
    """Merge and check settings, choose threads, load the pipeline: a :class:`Run` that writes nothing yet.

    Args:
        command: the command's name (first part of the default folder name).
        options: the command's parameters, usually ``locals()``.
        slug: words for the folder name (the prompt, the config's name).
        device: override the device (e.g. accelerate's process device).
        pinned: values above the config and below typed options (see :func:`merge_settings`).
        unused: common config keys this command does not use (dropped with a note).
        guided: the command uses the config's ``guide:`` (``settings["guide"]``); others drop it with a note.
    """
    settings, model_path = resolve(options, pinned=pinned, unused=unused, guided=guided)
    if settings.get("out") is not None:  # before the slow load, so it fails at once
        check_out_folder(settings["out"], overwrite_failed=bool(settings.get("overwrite_failed")))
    torch_device = runner.resolve_device(device or settings.get("device") or "auto")
    settings["threads"] = apply_threads(choose_threads(model_path, torch_device, settings.get("threads")))
    timings = Timings()
    with timings.phase("load"):
        pipe = load(settings, device=device)
    run = Run(command, settings, pipe, slug=slug, timings=timings)
    _ACTIVE.append(run)
    return run

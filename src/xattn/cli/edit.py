"""``xattn edit``: prompt-to-prompt editing from the command line, thin over :func:`xattn.edit.edit`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..edit import EditError, edit
from ..edit.run import MODES
from ..edit.windows import DEFAULT_KEY, parse_window
from ..runfolder import RunFolderError, save_image_atomic
from . import common

SHEET = "sheet.png"
NO_WINDOW = ("none", "off", "")


def _pairs(items: list[str] | None, option: str, what: str) -> dict[str, str]:
    """``["circle=0:0.4", ...]`` -> ``{"circle": "0:0.4"}``, with an error naming the option."""
    out: dict[str, str] = {}
    for item in items or []:
        word, sep, value = item.partition("=")
        if not sep or not word.strip() or not value.strip():
            raise EditError(f"{option} takes WORD={what.upper()}, e.g. {option} circle={'0:0.4' if what == 'window' else '2'}; "
                            f"got {item!r}")
        out[word.strip()] = value.strip()
    return out


def _weights(items: list[str] | None) -> dict[str, float]:
    weights = {}
    for word, value in _pairs(items, "--reweight", "weight").items():
        try:
            weights[word] = float(value)
        except ValueError:
            raise EditError(f"--reweight {word}={value}: the weight must be a number") from None
    return weights


def _window(text: str | None):
    return None if text is None or text.strip().lower() in NO_WINDOW else text


def register(app: typer.Typer) -> None:
    @app.command("edit", epilog=common.examples(
        'xattn edit --source "a red circle and a blue square" --target "a green circle and a blue square" --seed 3',
        'xattn edit --source "a red circle and a blue square" --target "a green circle and a blue square" '
        '--blend circle --cross-steps 0:0.8 --self-steps 0:0.4',
        'xattn edit --source "a red circle" --target "a red square" --target "a red triangle" --word-steps square=0:0.3',
        'xattn edit --source "a red circle" --target "a big red circle" --mode refine --reweight big=2',
    ))
    def edit_command(
        source: Annotated[str, typer.Option(help="The source prompt.", show_default=False)],
        target: Annotated[list[str], typer.Option(help="A target prompt; repeat for several, all in one batch.",
                                                  show_default=False)],
        mode: Annotated[str, typer.Option(help=f"How target tokens take the source's maps: {', '.join(MODES)} "
                                               "(auto: replace when the word counts match, refine otherwise).")] = "auto",
        blend: Annotated[Optional[str], typer.Option(help="Local blend: words whose maps bound the change, e.g. "
                                                          "circle or 'circle,square'.", show_default="no blending")] = None,
        threshold: Annotated[float, typer.Option(help="Local blend threshold, a fraction of the map's peak.")] = 0.3,
        cross_steps: Annotated[str, typer.Option(help="Steps where cross-attention is replaced: 0:0.8 or 0:20.")] = "0:0.8",
        word_steps: Annotated[Optional[list[str]], typer.Option(
            help="A word's own cross-attention window: circle=0:0.4 (repeatable).", show_default=False)] = None,
        self_steps: Annotated[str, typer.Option(help="Steps where self-attention is injected (none: never).")] = "0:0.4",
        self_res: Annotated[str, typer.Option(help="Map sizes where self-attention is injected.")] = "<=32",
        reweight: Annotated[Optional[list[str]], typer.Option(
            help="Weight a target word (prompt-to-prompt's equalizer, scale mode): green=2 (repeatable).",
            show_default=False)] = None,
        all_rows: Annotated[bool, typer.Option("--all-rows", help="Edit the unconditional rows too.")] = False,
        negative_prompt: common.NegativePrompt = None,
        model: common.Model = None, device: common.Device = None, dtype: common.Dtype = None,
        scheduler: common.Scheduler = None, seed: common.Seed = None, steps: common.Steps = None,
        guidance: common.Guidance = None, size: common.Size = None, out: common.Out = None,
        config: common.Config = None, progress: common.Progress = False,
    ):
        """Edit an image by editing attention: source and targets from one latent, plus a plain re-prompt."""
        options = dict(locals())
        with common.user_errors(EditError):
            # Everything that needs no model is checked before it loads.
            if mode not in MODES:
                raise EditError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
            windows = {DEFAULT_KEY: cross_steps, **_pairs(word_steps, "--word-steps", "window")}
            for word, window in windows.items():
                parse_window(window, what="--cross-steps" if word == DEFAULT_KEY else f"--word-steps {word}")
            self_window = _window(self_steps)
            parse_window(self_window, what="--self-steps")
            weights = _weights(reweight)
            blend_words = [w.strip() for w in blend.split(",") if w.strip()] if blend else None
            run = common.start("edit", options, slug=target[0] if target else source)
            settings = run.settings
            with run.timings.phase("generate"):
                result = edit(
                    run.pipe, source, list(target), mode=mode, cross_steps=windows, self_steps=self_window,
                    self_res=self_res, blend=blend_words, threshold=threshold, reweight=weights or None,
                    rows="all" if all_rows else "cond", seed=int(settings["seed"]), steps=int(settings["steps"]),
                    guidance=float(settings["guidance"]), size=settings.get("size"),
                    negative_prompt=settings.get("negative_prompt"),
                )
            seed_value = int(settings["seed"])
            names = result.file_names()
            record = {"edit": {k: result.settings[k] for k in ("source", "modes", "controllers")}}
            run.save_png(result.source, names["source"][0], prompt=source, seed=seed_value, xattn=record)
            for name, prompt, image in zip(names["targets"], target, result.targets):
                run.save_png(image, name, prompt=prompt, seed=seed_value, xattn=record)
            for name, prompt, image in zip(names["reprompts"], target, result.reprompts):
                run.save_png(image, name, prompt=prompt, seed=seed_value, xattn={"edit": "plain re-prompt"})
            sheet_path = run.folder / SHEET
            if sheet_path.exists():
                raise RunFolderError(f"{sheet_path} exists; a run never overwrites its files")
            save_image_atomic(result.sheet(), sheet_path)
            run.outputs.append(SHEET)
            run.finish(sheet=SHEET, edit=result.settings, files=names)

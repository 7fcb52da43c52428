"""``xattn edit``: prompt-to-prompt editing from the command line, thin over :func:`xattn.edit.edit`.

Writes ``source.png``, ``target.png`` (``target-1.png``... for several
targets), ``reprompt.png`` (the target prompt sampled plainly from the same
seed, for contrast), ``sheet.png`` (side by side) and the run's ``manifest.json``.
With ``--image``, a real image is inverted (:func:`xattn.invert`) and edited,
and ``input.png`` and ``reconstruction.png`` are written too.

Prompts are read in ``--syntax`` (A1111's by default): the edit runs on their
clean text, and a target prompt's weights (``a (green:1.5) circle``,
compel's ``a green++ circle``) weight those words as ``--reweight`` does
(a typed ``--reweight`` wins); the source prompt takes no weights. Prompts
over 75 tokens and ``BREAK`` are laid out in 77-slot chunks as ``xattn generate``
lays them out (a target may not fill more chunks than the source).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from ..app import runner
from ..edit import EditError, SelfInject, edit
from ..edit.defaults import recommended
from ..edit.blend import BLEND_DILATE, BLEND_STEPS, BLEND_THRESHOLD
from ..edit.controllers import SELF_RES_AUTO
from ..edit.run import MODES, check_pipeline, injects_self_attention
from ..inversion import METHODS, invert
from ..edit.windows import CROSS_STEPS, DEFAULT_KEY, SELF_STEPS, parse_window
from ..app.runfolder import RunFolderError, save_image_atomic
from ..validate import OptionError, number
from . import common

SHEET = "sheet.png"
INPUT, RECONSTRUCTION = "input.png", "reconstruction.png"
NO_WINDOW = ("none", "off")
# Defaults of the edit's own options; they are None on the command line so a --config file can set them.
EDIT_DEFAULTS: dict[str, Any] = {"mode": "auto", "threshold": BLEND_THRESHOLD, "blend_dilate": BLEND_DILATE,
                                 "blend_steps": BLEND_STEPS, "blend_pixels": None, "cross_steps": f"0:{CROSS_STEPS}",
                                 "self_steps": f"0:{SELF_STEPS}", "self_res": SELF_RES_AUTO}  # the library's, as text


def _pairs(items: list[str] | None, option: str, example: str) -> dict[str, str]:
    """``["circle=0:0.4", ...]`` -> ``{"circle": "0:0.4"}``, with an error naming the option."""
    out: dict[str, str] = {}
    for item in items or []:
        word, sep, value = item.partition("=")
        if not sep or not word.strip() or not value.strip():
            raise EditError(f"{option} takes WORD=VALUE, e.g. {option} {example}; got {item!r}")
        out[word.strip()] = value.strip()
    return out


def edit_options(values: Mapping[str, Any], model_edit: Mapping[str, Any] | None = None, *,
                 inverted: bool = False) -> dict[str, Any]:
    """Check the command's edit options and turn them into :func:`xattn.edit.edit` arguments.

    Runs twice: on the command line before the model loads (a typo fails at
    once), and on the settings merged with ``--config`` and the model's edit
    defaults (``model_edit``, the ``"edit"`` section of its ``xattn_defaults.json``),
    which fill what no flag or config value set; ``inverted``: the edit is of an
    ``--image`` (the section's ``inverted`` settings apply).
    """
    model = recommended(model_edit, values.get("source") or "", values.get("target") or [], inverted=inverted)
    given = {key: values.get(key) for key in EDIT_DEFAULTS}
    merged = {key: model.get(key, EDIT_DEFAULTS[key]) if value is None else value for key, value in given.items()}
    if merged["mode"] not in MODES:
        raise EditError(f"--mode must be one of {', '.join(MODES)}, not {merged['mode']!r}")
    windows = {DEFAULT_KEY: merged["cross_steps"], **_pairs(values.get("word_steps"), "--word-steps", "circle=0:0.4")}
    for word, window in windows.items():
        parse_window(window, what="--cross-steps" if word == DEFAULT_KEY else f"--word-steps {word}")
    self_steps = merged["self_steps"]
    if isinstance(self_steps, str) and self_steps.strip().lower() in NO_WINDOW:
        self_steps = None
    parse_window(self_steps, what="--self-steps")
    self_res = merged["self_res"]
    if isinstance(self_res, str) and self_res.strip().lower() == "all":
        self_res = None  # injection runs on fused SDPA, so every map size costs the same
    if isinstance(self_res, str) and self_res.strip().lower() == SELF_RES_AUTO:
        self_res = SELF_RES_AUTO  # the model decides (xattn.edit.run.default_self_res)
    else:
        SelfInject(res=self_res)  # checks the sizes now, before the model loads
    weights = {}
    for word, value in _pairs(values.get("reweight"), "--reweight", "green=2").items():
        try:
            weights[word] = number(value, f"--reweight {word}")
        except OptionError as error:
            raise EditError(str(error)) from None
    blend = values.get("blend")
    if blend is None:
        blend_words = model.get("blend")
    elif blend.strip().lower() in NO_WINDOW:
        blend_words = None  # --blend none: no blending, whatever the model recommends
    else:
        blend_words = [w.strip() for w in blend.split(",") if w.strip()]
        if not blend_words:
            raise EditError(f"--blend takes words of the prompts, e.g. circle or 'circle,square', or none; "
                            f"not {blend!r}")
    threshold = number(merged["threshold"], "--threshold")
    if not 0.0 <= threshold < 1.0:
        raise EditError(f"--threshold is a fraction of the map's peak in [0, 1), not {threshold:g}")
    try:
        parse_window(merged["blend_steps"], what="--blend-steps")
    except EditError as error:
        raise EditError(str(error) if "--blend-steps" in str(error) else f"--blend-steps: {error}") from None
    return {
        "mode": merged["mode"], "cross_steps": windows, "self_steps": self_steps, "self_res": self_res,
        "blend": blend_words, "threshold": threshold, "blend_dilate": _dilate(merged["blend_dilate"]),
        "blend_steps": merged["blend_steps"], "blend_pixels": _margin(merged["blend_pixels"]),
        "reweight": weights or None,
        "rows": "all" if values.get("all_rows") else "cond",
    }


def _dilate(value: Any) -> int:
    """``--blend-dilate`` as a whole number of latent pixels >= 0 (a config may give ``"2"`` or ``2.0``)."""
    try:
        dilate = float(value) if isinstance(value, str) and value.strip() else value
    except ValueError:
        dilate = None
    if isinstance(dilate, float) and dilate.is_integer():
        dilate = int(dilate)
    if isinstance(dilate, bool) or not isinstance(dilate, int) or dilate < 0:
        raise EditError(f"--blend-dilate is a whole number of latent pixels >= 0, not {value!r}")
    return dilate


def _margin(value: Any) -> int | None:
    """``--blend-pixels``: ``None`` or none/off (no composite), or a whole number of image pixels >= 0."""
    if value is None or (isinstance(value, str) and value.strip().lower() in NO_WINDOW):
        return None
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, int) or text < 0:
        raise EditError(f"--blend-pixels is a whole number of image pixels >= 0, or none, not {value!r}")
    return text


def unweighted(parsed) -> str:
    """A parsed prompt's clean text written in A1111's dialect without weights: brackets and backslashes
    escaped, each chunk break kept as ``BREAK`` (what :func:`xattn.edit.edit` reads, ``syntax="a1111"``)."""
    parts = []
    for fragment in parsed.fragments:
        parts.append(" BREAK " if fragment.is_break else re.sub(r"([\\()\[\]])", r"\\\1", fragment.text))
    return "".join(parts)


def prompt_weights(source: str, targets: list[str], syntax: str) -> tuple[str, list[str], dict[str, float]]:
    """The source and targets unweighted (:func:`unweighted`: clean text, BREAK kept), and the target
    words' weights (``--reweight``'s form). Long prompts and BREAK are the edit's to lay out in chunks."""
    from ..prompts import parse_prompt
    from ..tokens import split_words

    def read(text: str, what: str):
        if not text.strip():
            raise EditError(f"the {what} prompt is empty: an edit carries the source prompt's words over to "
                            "each target's, so both need words")
        return parse_prompt(text, syntax=syntax)

    parsed_source = read(source, "source")
    if parsed_source.spans:
        listed = ", ".join(f"{span.text}:{span.weight:g}" for span in parsed_source.spans)
        raise EditError(f"the source prompt {source!r} weights {listed} ({syntax} syntax): an edit keeps the source "
                        "as it is; weight target words instead (in a target prompt, or with --reweight WORD=W)")
    weights: dict[str, float] = {}
    texts = []
    for target in targets:
        parsed = read(target, "target")
        texts.append(unweighted(parsed))
        for span in parsed.spans:
            for word, _, _ in split_words(span.text):
                if weights.setdefault(word, span.weight) != span.weight:
                    raise EditError(f"the target prompts weight {word!r} both {weights[word]:g} and {span.weight:g}; "
                                    "an edit weights a word once for every target")
    return unweighted(parsed_source), texts, weights


def register(app: typer.Typer) -> None:
    @app.command("edit", epilog=common.examples(
        'xattn edit --source "a red square and a blue circle" --target "a green square and a blue circle" --seed 3',
        'xattn edit --source "a red square and a blue circle" --target "a green square and a blue circle" '
        '--blend none --cross-steps 0:0.8 --self-steps 0:0.4',
        'xattn edit --source "a red circle" --target "a red square" --target "a red triangle" '
        '--word-steps square=0:0.3',
        'xattn edit --source "a red circle" --target "a big red circle" --mode refine --reweight big=2',
        'xattn edit --source "a red circle" --target "a green++ circle" --syntax compel',
        'xattn edit --source "a red circle BREAK a blue square" --target "a (green:1.5) circle BREAK a blue square"',
    ))
    def edit_command(
        source: Annotated[str, typer.Option(help="The source prompt.", show_default=False)],
        target: Annotated[list[str], typer.Option(help="A target prompt; repeat for several, all in one batch.",
                                                  show_default=False)],
        mode: Annotated[Optional[str], typer.Option(
            help=f"How target tokens take the source's maps: {', '.join(MODES)} (auto: replace when the word "
                 "counts match, refine otherwise).", show_default=EDIT_DEFAULTS["mode"])] = None,
        blend: Annotated[Optional[str], typer.Option(
            help="Local blend: words whose maps bound the change, e.g. circle or 'circle,square'; none: off.",
            show_default="the model's edit defaults, else no blending")] = None,
        threshold: Annotated[Optional[float], typer.Option(
            help="Local blend threshold, a fraction of the map's peak.",
            show_default=f"the model's edit defaults, else {EDIT_DEFAULTS['threshold']}")] = None,
        blend_dilate: Annotated[Optional[int], typer.Option(
            help="Latent pixels by which the local blend's mask is widened (0: as thresholded).",
            show_default=f"the model's edit defaults, else {EDIT_DEFAULTS['blend_dilate']}")] = None,
        blend_steps: Annotated[Optional[str], typer.Option(
            help="Steps after which the local blend puts the source back outside its mask: 0:1.0 (every step).",
            show_default=f"the model's edit defaults, else {EDIT_DEFAULTS['blend_steps']}")] = None,
        blend_pixels: Annotated[Optional[str], typer.Option(
            help="After decoding, take the edited image's pixels farther than N pixels outside the blend mask "
                 "from the source image, so the VAE decoder cannot tint what the blend kept (none: off).",
            show_default="the model's edit defaults, else none")] = None,
        cross_steps: Annotated[Optional[str], typer.Option(
            help="Steps where cross-attention is replaced: 0:0.8 (fractions) or 0:20 (indices).",
            show_default=EDIT_DEFAULTS["cross_steps"])] = None,
        word_steps: Annotated[Optional[list[str]], typer.Option(
            help="A word's own cross-attention window: circle=0:0.4 (repeatable).", show_default=False)] = None,
        self_steps: Annotated[Optional[str], typer.Option(
            help="Steps where self-attention is injected (none: never).",
            show_default=EDIT_DEFAULTS["self_steps"])] = None,
        self_res: Annotated[Optional[str], typer.Option(
            help="Map sizes where self-attention is injected: auto (<=32, prompt-to-prompt's, on a UNet; every "
                 "site on a transformer, whose sites share one grid), 16, <=32, or all (injection runs fused, "
                 "so every size costs the same).",
            show_default=EDIT_DEFAULTS["self_res"])] = None,
        reweight: Annotated[Optional[list[str]], typer.Option(
            help="Weight a target word (prompt-to-prompt's equalizer, scale mode): green=2 (repeatable).",
            show_default=False)] = None,
        all_rows: Annotated[bool, typer.Option("--all-rows", help="Edit the unconditional rows too.")] = False,
        image: Annotated[Optional[Path], typer.Option(
            parser=common.given_path,
            help="Edit this image instead of a sampled one: it is inverted with --source (its size must be "
                 "the model's or --size; DDIM scheduler); the model's edit defaults for inverted images apply.",
            show_default=False)] = None,
        invert_method: Annotated[Optional[str], typer.Option(
            "--invert", help=f"Inversion method for --image: {', '.join(METHODS)}.",
            show_default="direct")] = None,
        negative_prompt: common.NegativePrompt = None, syntax: common.Syntax = "a1111",
        model: common.Model = None, device: common.Device = None, dtype: common.Dtype = None,
        scheduler: common.Scheduler = None, seed: common.Seed = None, steps: common.Steps = None,
        guidance: common.Guidance = None, size: common.Size = None, max_pixels: common.MaxPixels = None,
        threads: common.Threads = None, out: common.Out = None, overwrite_failed: common.OverwriteFailed = False,
        config: common.Config = None, progress: common.Progress = True,
    ):
        """Edit an image by editing attention: source and targets from one latent, plus a plain re-prompt."""
        options = dict(locals())
        options.pop("image"), options.pop("invert_method")  # not run settings: the image is recorded as input.png
        with common.user_errors(EditError):
            if invert_method is not None and image is None:
                raise EditError("--invert needs --image (the image to invert)")
            if invert_method is not None and invert_method not in METHODS:
                raise EditError(f"--invert must be one of {', '.join(METHODS)}, not {invert_method!r}")
            edit_options(options)  # fail on a typo before the model loads
            prompt_weights(source, list(target), syntax)
            run = common.start("edit", options, slug=target[0] if target else source, unused=("sites",))
            settings = run.settings
            written = source
            source, target, weights = prompt_weights(source, list(target), run.syntax)
            model_edit = runner.model_defaults(runner.resolve_model(settings.get("model"))).get("edit")
            arguments = edit_options({**settings, "source": source, "target": target}, model_edit,
                                     inverted=image is not None)
            arguments["reweight"] = {**weights, **(arguments["reweight"] or {})} or None  # a typed --reweight wins
            seed_value = int(settings["seed"])
            check_pipeline(run.pipe, settings.get("negative_prompt"), image)  # Flux: before any inversion
            if settings.get("self_steps") is None and not injects_self_attention(run.pipe):
                arguments["self_steps"] = None  # Sana: linear self-attention, no maps; the default window is dropped
            inversion = None
            if image is not None:
                with run.timings.phase("invert"):
                    inversion = invert(run.pipe, image, source, method=invert_method or "direct",
                                       steps=int(settings["steps"]), size=settings.get("size"),
                                       guidance=float(settings["guidance"]))
                for name, picture in ((INPUT, inversion.image), (RECONSTRUCTION,
                                      inversion.reconstruct(guidance=float(settings["guidance"])))):
                    run.save_png(picture, name, prompt=source, seed=seed_value, xattn={"edit": name[:-4]})
            with run.timings.phase("generate"):
                result = edit(run.pipe, source, list(target), **arguments, seed=seed_value,
                              steps=int(settings["steps"]), guidance=float(settings["guidance"]),
                              size=settings.get("size"), negative_prompt=settings.get("negative_prompt"),
                              inversion=inversion)
            names = result.file_names()
            record = {"edit": {key: result.settings[key] for key in ("source", "modes", "controllers")}}
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
            run.finish(sheet=SHEET, edit=result.settings, files=names, model_edit_defaults=model_edit,
                       syntax=run.syntax, prompt_weights=weights, written_source=written)

"""``xattn maps``: generate with a capture running, then write the word maps every way a person reads them.

A run folder gets: ``image-<k>.png`` (the generated images), ``words.png``
(every word of the prompt over the first image), ``resolutions.png`` (the
first ``--token``, else the most attended word, per resolution), ``steps.png``
(with ``--per-step``: how it evolves), ``report.html`` (explore words, steps, resolutions in a browser),
``maps.safetensors`` and ``manifest.json`` (the run's settings with the maps'
manifest under ``"maps"``; ``xattn.capture.export.load_maps(folder)`` reads it back).

With ``--image``, the maps are those of a real image: it is inverted with the
prompt (:func:`xattn.invert`, ``direct`` by default, which follows the inverted
trajectory exactly) and the capture runs while it is regenerated; the folder
also holds ``input.png``. With ``--concepts`` on a joint-attention transformer
(SD3 family), ``concepts.png`` shows ConceptAttention maps of those words
(:func:`xattn.concepts`), which need not be in the prompt.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from PIL import Image

from ..capture import Capture, pictures
from ..capture.controller import DEFAULT_BUDGET
from ..capture.export import MAPS_FILE, maps_manifest, save_maps
from ..capture.report import write_report
from ..concepts import ConceptError, concepts as concept_maps
from ..inversion import METHODS, InversionError, invert
from ..selector import Selector
from ..validate import OptionError, parse_size
from ..tokens import TokenError, TokenMap
from . import common

WORD_GRID = "words.png"
RESOLUTIONS = "resolutions.png"
STEP_STRIP = "steps.png"
REPORT = "report.html"
CONCEPTS = "concepts.png"
INPUT = "input.png"


def capture_selector(sites: list[str] | None, res: list[str] | None, steps: str | None,
                     base: str | None = None) -> Selector:
    """The capture's selector: the config's ``sites:`` selector (``base``), narrowed by ``--site``, ``--res``, ``--window``."""
    fields = {**(Selector.coerce(base).to_dict() if base else {}), "kind": "cross"}
    if sites:
        fields["sites"] = list(sites)
    if res:
        fields["res"] = list(res)
    if steps is not None:  # "" is refused by the selector, not read as every step
        fields["steps"] = steps
    return Selector.from_dict(fields)


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        'xattn maps "a red square and a blue circle"',
        'xattn maps "a red square and a blue circle" --token red --token circle --res 16 --out outputs/maps-red',
        'xattn maps "a green triangle" --per-step --window 0:10 --site "up_blocks.*"',
        'xattn maps "a red++ circle" --syntax compel',
        'xattn maps "a house" --model path/to/sd15 --controlnet path/to/canny --control-image edges.png',
        'xattn maps "a red square and a blue circle" --image photo.png',
        'xattn maps "a blue triangle and a yellow circle" --model dit --concepts blue,yellow,triangle,circle,green',
    ))
    def maps(
        prompt: Annotated[str, typer.Argument(show_default=False, help="The prompt.")],
        token: Annotated[Optional[list[str]], typer.Option(
            "--token", "-t", help="A word or phrase to show (repeat for several): red, circle#2, 'red circle'.",
            show_default="every word")] = None,
        site: Annotated[Optional[list[str]], typer.Option(
            help="Capture only sites matching this glob (repeatable): 'up_blocks.*'.",
            show_default="every cross-attention site")] = None,
        res: Annotated[Optional[list[str]], typer.Option(
            help="Capture only maps of this size (repeatable): 16, '<=16', 16x24.", show_default="every size")] = None,
        window: Annotated[Optional[str], typer.Option(
            help="Capture only these steps: 0:10, 5:, or fractions 0:0.5 (--steps is the number of steps).",
            show_default="every step")] = None,
        per_step: Annotated[bool, typer.Option(
            "--per-step", help="Keep a map per step and site (fp16, under --budget) to see how maps evolve.")] = False,
        budget: Annotated[str, typer.Option(help="Most memory the capture may hold: 256MB, 2GiB.")] = DEFAULT_BUDGET,
        scale: Annotated[str, typer.Option(
            help="Colours of the pictures: shared (one scale for every panel, weak words stay dim) or panel "
                 "(each panel from its own min to its max).")] = pictures.DEFAULT_SCALE,
        images: Annotated[int, typer.Option("--images", "-i", min=1, help="Images to make; image i uses seed + i.")] = 1,
        negative_prompt: common.NegativePrompt = None, syntax: common.Syntax = "a1111",
        model: common.Model = None, config_folder: common.ConfigFolder = None, lora_dir: common.LoraDir = None,
        device: common.Device = None, dtype: common.Dtype = None,
        scheduler: common.Scheduler = None, seed: common.Seed = None, steps: common.Steps = None,
        guidance: common.Guidance = None, size: common.Size = None, max_pixels: common.MaxPixels = None,
        threads: common.Threads = None, out: common.Out = None, overwrite_failed: common.OverwriteFailed = False,
        config: common.Config = None, progress: common.Progress = True,
        controlnet: common.ControlNet = None, control_image: common.ControlImage = None,
        control_scale: common.ControlScale = None, ip_adapter: common.IPAdapter = None,
        ip_image: common.IPImage = None, ip_scale: common.IPScale = None,
        image: Annotated[Optional[Path], typer.Option(
            parser=common.given_path,
            help="Map this real image instead of a generated one: it is inverted with the prompt (its size must "
                 "be the model's or --size; DDIM scheduler).", show_default=False)] = None,
        invert_method: Annotated[Optional[str], typer.Option(
            "--invert", help=f"Inversion method for --image: {', '.join(METHODS)}.", show_default="direct")] = None,
        concepts: Annotated[Optional[str], typer.Option(
            help="Also draw ConceptAttention maps of these comma-separated words (any words, in the prompt or "
                 "not) on a joint-attention transformer (SD3 family): concepts.png.", show_default=False)] = None,
    ):
        """Capture where each word of the prompt lands: images, word grid, HTML report, maps and manifest."""
        options = dict(locals())
        real = {"image": options.pop("image"), "method": options.pop("invert_method")}  # the image is input.png
        words = _concept_words(options.pop("concepts"))
        with common.user_errors(InversionError, ConceptError):
            if real["method"] is not None and real["image"] is None:
                raise OptionError("--invert needs --image (the image to invert)")
            if real["method"] is not None and real["method"] not in METHODS:
                raise OptionError(f"--invert must be one of {', '.join(METHODS)}, not {real['method']!r}")
            if real["image"] is not None and images != 1:
                raise OptionError("--image maps one real image; drop --images")
            if real["image"] is not None and (controlnet or ip_adapter):
                raise OptionError("--image regenerates the image from its inversion alone; drop --controlnet / "
                                  "--ip-adapter")
            settings, _ = common.resolve(options)  # the config's `sites:` is part of the selector
            common.runner.read_adapters(settings)  # --controlnet / --ip-adapter checked before loading
            capture = _capture(site, res, window, per_step, budget, settings.get("sites"))  # fails before loading
            selector = capture.selector
            if scale not in pictures.SCALES:
                raise OptionError(f"--scale must be one of {', '.join(pictures.SCALES)}, not {scale!r}")
            with common.start("maps", options, slug=prompt) as run:
                _maps(run, prompt, token, capture, selector, images, per_step, budget, scale, real, words)


def _concept_words(text: str | None) -> list[str] | None:
    if text is None:
        return None
    words = [word.strip() for word in text.split(",")]
    if not all(words):
        raise typer.BadParameter(f"--concepts takes comma-separated words such as red,circle,background, not {text!r}")
    return words


def _maps(run, prompt: str, token, capture: Capture, selector: Selector, images: int, per_step: bool,
          budget: str, scale: str = pictures.DEFAULT_SCALE, real: dict | None = None,
          concepts: list[str] | None = None) -> None:
    """Everything after loading: check the words and map sizes, generate, write the files."""
    real = real or {"image": None, "method": None}
    extra = common.attach_adapters(run)  # --controlnet / --ip-adapter: maps from the pipeline they make
    negative = run.settings.get("negative_prompt")
    if real["image"] is not None and (negative or run.hook_names([prompt], None)):
        raise OptionError("--image inverts the prompt as plain text: drop --negative-prompt and write the prompt "
                          "without weights, BREAK or editing")
    names = run.hook_names([prompt], [negative] * images if negative else None)  # weighted / long, in --syntax
    tokenizer = names.get("tokenizer", run.pipe.tokenizer)
    token_map = TokenMap(tokenizer, prompt)
    if not token_map.words:
        raise OptionError(f"the prompt {prompt!r} has no words to map; pass a prompt with words")
    shown = list(token) if token else None
    for word in shown or []:
        token_map.indices(word)  # an unknown word fails before generating
    _check_selection(run, selector)
    found = None
    with ExitStack() as stack:
        if concepts is not None:
            found = stack.enter_context(concept_maps(run.pipe, concepts))
        if real["image"] is not None:
            pictures_made = [_real_image(run, prompt, real, capture)]
        else:
            stack.enter_context(_hooks(run.pipe, capture, names))
            pictures_made = run.generate(prompt, num_images_per_prompt=images, **extra)
    word_maps = capture.maps()
    if found is not None:
        run.save_image(pictures.concept_grid(pictures_made[0], found, title=prompt), CONCEPTS)
    first_seed = int(run.settings["seed"])
    for index, image in enumerate(pictures_made):
        run.save_png(image, f"image-{index}.png", prompt=prompt, seed=first_seed + index,
                     xattn={"maps": {"selector": str(selector), "per_step": per_step},
                            **({"syntax": run.syntax} if run.syntax != "a1111" else {})})
    focus = shown[0] if shown else _most_attended(word_maps)
    shown = shown or word_maps.words(0)
    run.save_image(_word_grids(pictures_made[0], word_maps, token, scale), WORD_GRID)
    holder = next(sub for sub in range(word_maps.num_prompts) if _names(word_maps, sub, focus))  # AND: its sub-prompt
    run.save_image(pictures.resolution_breakdown(pictures_made[0], word_maps, focus, holder, scale=scale), RESOLUTIONS)
    if per_step:
        run.save_image(pictures.step_strip(pictures_made[0], word_maps, focus, holder, scale=scale), STEP_STRIP)
    write_report(word_maps, _images_per_prompt(pictures_made, word_maps), run.new_path(REPORT), title=prompt)
    run.new_path(MAPS_FILE)
    save_maps(word_maps, run.folder, manifest=False)
    seeds = [first_seed + k for k in range(len(pictures_made))]
    inverted = {} if real["image"] is None else {"image": str(real["image"]), "inversion": real["method"] or "direct"}
    run.finish(maps=maps_manifest(word_maps, seed=seeds, extra={
        "selector": str(selector), "per_step": per_step, "budget": budget, "shown_words": shown,
        "focus_word": focus, "syntax": run.syntax, **inverted,
        **({} if concepts is None else {"concepts": concepts})}))


def _word_grids(image, word_maps, token, scale: str):
    """words.png: the word grid of the prompt; with AND, one grid per sub-prompt, stacked (they share the image)."""
    grids = []
    for sub in range(word_maps.num_prompts):
        words = [word for word in token if _names(word_maps, sub, word)] if token else word_maps.words(sub)
        if words:
            grids.append(pictures.word_grid(image, word_maps, sub, words=words, scale=scale))
    if len(grids) == 1:
        return grids[0]
    sheet = Image.new("RGB", (max(grid.width for grid in grids), sum(grid.height for grid in grids)), "white")
    top = 0
    for grid in grids:
        sheet.paste(grid, (0, top))
        top += grid.height
    return sheet


def _names(word_maps, sub: int, word: str) -> bool:
    """Whether sub-prompt ``sub`` holds ``word`` (a word or phrase, as --token takes it)."""
    try:
        word_maps.token_map(sub).indices(word)
    except TokenError:
        return False
    return True


def _images_per_prompt(made: list, word_maps) -> list:
    """The images in the maps' order; the sub-prompts of an AND prompt all drew the same images."""
    if word_maps.num_prompts > 1 and len(made) == word_maps.images_per_prompt:
        return [image for _ in range(word_maps.num_prompts) for image in made]
    return made


def _real_image(run, prompt: str, real: dict, capture: Capture):
    """Invert the image with the prompt, save it as input.png, and regenerate it with the capture running."""
    settings = run.settings
    guidance = float(settings["guidance"])
    with run.timings.phase("invert"):
        inversion = invert(run.pipe, real["image"], prompt, method=real["method"] or "direct",
                           steps=int(settings["steps"]), size=settings.get("size"), guidance=guidance)
    run.save_png(inversion.image, INPUT, prompt=prompt, seed=int(settings["seed"]), xattn={"maps": "input"})
    with run.timings.phase("generate"):
        return inversion.reconstruct(guidance=guidance, also=[capture])


def map_sizes(pipe, size: str | None) -> list[tuple[int, int]] | None:
    """Every map size the denoiser's attention can have at this image size (None when xattn cannot tell)."""
    unet = getattr(pipe, "unet", None)
    channels = getattr(getattr(unet, "config", None), "block_out_channels", None)
    if channels is None:
        return _patch_grid(pipe, size)
    scale = getattr(pipe, "vae_scale_factor", 8)
    width, height = parse_size(size, max_pixels=None) if size else (unet.config.sample_size * scale,) * 2
    h, w = height // scale, width // scale
    sizes = []
    for _ in channels:
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)  # a stride-2 convolution with padding 1
    return sizes


def _patch_grid(pipe, size: str | None) -> list[tuple[int, int]] | None:
    """A transformer's one map size: its token grid (latent / patch; Flux packs 2x2 latent pixels per token)."""
    from ..sites import PACKING

    model = getattr(pipe, "transformer", None)
    config = getattr(model, "config", None)
    patch = PACKING if type(model).__name__.startswith("Flux") else getattr(config, "patch_size", None)
    sample = getattr(config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if not isinstance(patch, int) or not isinstance(scale, int) or (size is None and not isinstance(sample, int)):
        return None
    width, height = parse_size(size, max_pixels=None) if size else (sample * scale,) * 2
    return [(-(-(height // scale) // patch), -(-(width // scale) // patch))]


def _check_selection(run, selector: Selector) -> None:
    """Refuse a --site or --res that matches nothing in this model, before generating."""
    from ..sites import sites

    cross = [site for site in sites(run.pipe) if site.kind in ("cross", "joint")]  # kind=cross reads joint too
    if not selector.select_sites(cross):
        raise OptionError(f"no cross-attention site matches {selector}; list them with `xattn sites --kind cross`")
    sizes = map_sizes(run.pipe, run.settings.get("size"))
    if sizes is not None and not any(selector.matches_res(hw) for hw in sizes):
        listed = ", ".join(f"{h}" if h == w else f"{h}x{w}" for h, w in sizes)
        raise OptionError(f"no attention map matches {selector} at this image size; the maps are {listed}")


def _capture(site, res, window, per_step: bool, budget: str, base: str | None = None) -> Capture:
    selector = capture_selector(site, res, window, base)
    try:
        return Capture(selector, per_step=per_step, budget=budget)
    except ValueError as error:  # a bad --budget
        raise OptionError(str(error)) from None


def _most_attended(word_maps) -> str:
    """The prompt's word with the largest share of attention (the first picture's focus when no --token)."""
    totals = word_maps.token_totals(0, 0)
    return max(word_maps.words(0), key=lambda word: totals.get(word, 0.0))


def _hooks(pipe, capture, names=None):
    from .. import hooks

    return hooks(pipe, capture, **(names or {}))

"""``xattn generate``: prompt(s) to PNGs that carry their own generation parameters.

``--from-png`` reads a PNG's ``parameters`` chunk and makes the same image
again: plain generations (``generate``, ``maps``, generate sweeps) and
reweighted ones (``reweight`` and reweight sweeps record the controller under
``xattn.reweight``). Edited images need ``xattn edit``, and say so.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..validate import OptionError, check_settings
from . import common

# Commands whose images are a plain generation, or a reweighted one, of the PNG's settings.
_REPRODUCIBLE = (None, "generate", "maps", "reweight", "sweep")


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        'xattn generate "a red square and a blue circle" --seed 3',
        'xattn generate "a green triangle" --images 4 --steps 30 --out outputs/triangles',
        "xattn generate --model path/to/sd15 --size 512x768 --scheduler euler-a \"a cat\"",
        "xattn generate --from-png outputs/generate-.../image-0.png",
        'xattn generate "a red circle" --box "red circle=0,0,0.5,1" --seed 3',
        'xattn generate "a red++ circle" --syntax compel',
        'xattn generate "a house" --model path/to/sd15 --controlnet path/to/canny --control-image edges.png',
        'xattn generate "a cat" --model path/to/sd15 --ip-adapter path/to/ip-adapter --ip-image cat.png',
    ))
    def generate(
        prompt: Annotated[Optional[str], typer.Argument(show_default=False, help="The prompt.")] = None,
        images: Annotated[int, typer.Option("--images", "-i", min=1, help="Images to make; image i uses seed + i.")] = 1,
        from_png: Annotated[Optional[Path], typer.Option(
            "--from-png", parser=common.given_path,
            help="Make a PNG's image again from its 'parameters' chunk (typed options override it).")] = None,
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
        excite: Annotated[Optional[str], typer.Option(
            help="Guidance (Attend-and-Excite): words whose attention must peak somewhere, e.g. circle,square.")] = None,
        bind: Annotated[Optional[str], typer.Option(
            help="Guidance: pull each modifier's attention onto its noun's, e.g. red=circle,blue=square.")] = None,
        box: Annotated[Optional[list[str]], typer.Option(
            help="Guidance: a phrase's attention inside a box, 'red circle=x0,y0,x1,y1' in fractions "
                 "of the image (repeat for several).")] = None,
        focus: Annotated[Optional[str], typer.Option(
            help="Guidance: one object; the words' attention kept inside one disk the image picks, "
                 "e.g. red,circle.")] = None,
        focus_radius: Annotated[Optional[float], typer.Option(
            help="--focus's disk radius, a fraction of the image's side (default 0.35).")] = None,
        guide_steps: Annotated[Optional[str], typer.Option(
            help="Steps to guide: a window such as 0.5 (the first half, default) or 0:10.")] = None,
        guide_step_size: Annotated[Optional[float], typer.Option(
            help="Size of each guidance step on the latents (default 20, Attend-and-Excite's).")] = None,
        guide_refine: Annotated[Optional[str], typer.Option(
            help="Iterative refinement (Attend-and-Excite): at these steps, step again until the guidance loss "
                 "is at most the target, e.g. 0:0.95,10:0.5 (steps inside --guide-steps; at most 20 repeats "
                 "each). With --excite alone the target is 1 - the paper's threshold.")] = None,
    ):
        """Generate images from a prompt and save them as PNGs with A1111-style parameters.

        With --excite, --bind, --box or --focus, attention guidance steers the latents
        during sampling (docs/guidance.md); the PNG records it for --from-png.
        A --config's `guide:` mapping is used when no guidance option is typed;
        a typed one replaces it whole.
        """
        options = dict(locals())
        options.pop("from_png")
        with common.user_errors():
            common.runner.read_adapters(options)  # typed --controlnet / --ip-adapter: checked before loading
            pinned, controllers = _from_png(from_png, max_pixels) if from_png is not None else ({}, {})
            guide = _guide(excite, bind, box or [], focus, focus_radius, guide_steps, guide_step_size, guide_refine)
            window_name = "--guide-steps"
            if guide is not None:
                controllers["guide"] = guide
            text = prompt or pinned.get("prompt")
            if not text:
                raise OptionError("no prompt given; pass a PROMPT or --from-png FILE")
            with common.start("generate", options, slug=text, pinned=pinned, unused=("sites",),
                              guided=True) as run:
                settings = run.settings
                configured = settings.pop("guide", None)  # the config's guide:; the manifest records the one used
                extra = common.attach_adapters(run)  # --controlnet / --ip-adapter: the call's images and scales
                if guide is None and "guide" in controllers:
                    guide = controllers["guide"]  # recorded in the PNG
                elif guide is None and configured is not None:
                    guide = controllers["guide"] = _configured_guide(configured)  # no guidance option typed
                    window_name = f"{config}: guide.steps"
                if guide is not None:
                    guide.check_run(settings["steps"], window_name)  # refused before sampling
                record = {name: controller.to_dict() for name, controller in controllers.items()} or None
                in_png = {**(record or {}), **({"syntax": run.syntax} if run.syntax != "a1111" else {})} or None
                negative = settings.get("negative_prompt")
                names = run.hook_names([settings["prompt"]], [negative] if negative else None) if controllers else {}
                with _session(run.pipe, list(controllers.values()), names):
                    pictures = run.generate(settings["prompt"], num_images_per_prompt=settings["images"], **extra)
                for index, image in enumerate(pictures):
                    run.save_png(image, f"image-{index}.png", prompt=settings["prompt"],
                                 seed=settings["seed"] + index, xattn=in_png)  # --from-png reads the dialect
                run.finish(**(record or {}))


def _guide(excite, bind, boxes, focus, focus_radius, steps, step_size, refine):
    from ..guide import guide_from_text

    return guide_from_text(excite=excite, bind=bind, boxes=boxes, focus=focus, focus_radius=focus_radius,
                           steps=steps, step_size=step_size, refine=refine)


def _configured_guide(record):
    from ..app.config import guide_from_config

    return guide_from_config(record)


def _session(pipe, controllers: list, names: dict | None = None):
    """An xattn session with ``controllers`` (``names``: rows of weighted or long prompts), or nothing when there are none."""
    if not controllers:
        return nullcontext()
    from ..session import hooks

    return hooks(pipe, *controllers, **(names or {}))


def _from_png(png: Path, max_pixels: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The generation settings stored in a PNG, checked like typed ones, and the controllers it records.

    The model comes only from xattn's own ``xattn`` field (A1111's ``Model:`` is a display name).

    Raises:
        PngMetadataError: no readable parameters.
        OptionError: a value the command line would refuse, or an image generate cannot repeat (``edit``).
    """
    from ..app.pngmeta import read_parameters
    from ..app.runner import scheduler_from_a1111

    params = read_parameters(png)
    own = params["xattn"]
    command = own.get("command")
    if command not in _REPRODUCIBLE or "edit" in own:
        raise OptionError(
            f"{png} was made by `xattn {command}`, which generate cannot repeat; "
            f"rerun that command with the settings in its parameters: {own}")
    stored = {
        "prompt": params["prompt"],
        "negative_prompt": params["negative_prompt"],
        "steps": params["steps"],
        "guidance": params["cfg_scale"],
        "seed": params["seed"],
        "size": f"{params['width']}x{params['height']}",
        "scheduler": own.get("scheduler") or (scheduler_from_a1111(params["sampler"]) if params["sampler"] else None),
        "model": own.get("model"),
        "dtype": own.get("dtype"),
        "syntax": own.get("syntax"),
    }
    stored = {key: value for key, value in stored.items() if value is not None}
    stored = check_settings({**stored, "max_pixels": max_pixels}, source=f"{png}: ")
    stored.pop("max_pixels")
    from ..reweight import Reweight

    record = own.get("reweight")
    if record is not None and not isinstance(record, dict):
        raise OptionError(f"{png}: its xattn.reweight value must be a JSON object, not {record!r}")
    try:
        reweight = Reweight.from_dict(record) if record else None
    except (KeyError, TypeError, AttributeError) as error:
        raise OptionError(f"{png}: its xattn.reweight value is not a reweighting ({error})") from None
    controllers = {"reweight": reweight} if reweight is not None else {}
    guided = own.get("guide")
    if guided is not None:
        from ..guide import Guide

        try:
            controllers["guide"] = Guide.from_dict(guided)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise OptionError(f"{png}: its xattn.guide value is not a guidance record ({error})") from None
    return stored, controllers

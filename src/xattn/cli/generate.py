"""``xattn generate``: prompt(s) to PNGs that carry their own generation parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common


def register(app: typer.Typer) -> None:
    @app.command(epilog=common.examples(
        'xattn generate "a red circle and a blue square" --seed 3',
        'xattn generate "a green triangle" --images 4 --steps 30 --out outputs/triangles',
        "xattn generate --model path/to/sd15 --size 512x768 --scheduler euler-a \"a cat\"",
        "xattn generate --from-png outputs/generate-.../image-0.png",
    ))
    def generate(
        prompt: Annotated[Optional[str], typer.Argument(show_default=False, help="The prompt.")] = None,
        images: Annotated[int, typer.Option("--images", "-i", min=1, help="Images to make; image i uses seed + i.")] = 1,
        from_png: Annotated[Optional[Path], typer.Option(
            "--from-png", help="Regenerate a PNG from its 'parameters' chunk (other options override it).")] = None,
        negative_prompt: common.NegativePrompt = None,
        model: common.Model = None, device: common.Device = None, dtype: common.Dtype = None,
        scheduler: common.Scheduler = None, seed: common.Seed = None, steps: common.Steps = None,
        guidance: common.Guidance = None, size: common.Size = None, out: common.Out = None,
        config: common.Config = None, progress: common.Progress = True,
    ):
        """Generate images from a prompt and save them as PNGs with A1111-style parameters."""
        with common.user_errors():
            options = dict(locals())
            options.pop("from_png")
            pinned = _from_png(from_png) if from_png is not None else {}
            text = prompt or pinned.get("prompt")
            if not text:
                raise common.runner.OptionError("no prompt given; pass a PROMPT or --from-png FILE")
            with common.start("generate", options, slug=text, pinned=pinned) as run:
                settings = run.settings
                pictures = run.generate(settings["prompt"], num_images_per_prompt=settings["images"])
                for index, image in enumerate(pictures):
                    run.save_png(image, f"image-{index}.png", prompt=settings["prompt"],
                                 seed=settings["seed"] + index)
                run.finish()


def _from_png(png: Path) -> dict:
    """The generation settings stored in a PNG's parameters (typed options still win)."""
    from ..pngmeta import read_parameters
    from ..runner import scheduler_from_a1111

    params = read_parameters(png)
    own = params["xattn"]
    stored = {
        "prompt": params["prompt"],
        "negative_prompt": params["negative_prompt"],
        "steps": params["steps"],
        "guidance": params["cfg_scale"],
        "seed": params["seed"],
        "size": f"{params['width']}x{params['height']}",
        "scheduler": own.get("scheduler") or (scheduler_from_a1111(params["sampler"]) if params["sampler"] else None),
        "model": own.get("model", params["model"]),
        "dtype": own.get("dtype"),
    }
    return {key: value for key, value in stored.items() if value is not None}

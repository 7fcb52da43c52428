"""Load a pipeline and generate images, the same way for every command.

Everything the CLI does goes through two functions:

- :func:`load_pipeline` (:mod:`xattn.app.loading`) turns a model reference (a
  local folder, a Hub id in the local cache, or nothing for the embedded
  shapes-world model) into a diffusers pipeline on the requested device, dtype
  and scheduler; :mod:`xattn.app.addons` adds ControlNets, IP-Adapters and LoRAs.
- :func:`generate` (here) runs the pipeline with one CPU ``torch.Generator`` per
  image, seeded ``seed + index``, so the same call gives the same pixels.

The loading and add-on names are importable from here too, as they always were.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters import at_asked_size
from ..errors import XattnError
from ..validate import OptionError, parse_size
from ..validate import seed as validate_seed
from .addons import (CONTROLNET_PIPELINES, AdapterError, Adapters, adapter_call_kwargs, apply_loras,
                     attach_adapters, native_size, read_adapters)
from .loading import (DEFAULTS_FILE, DEVICES, DTYPES, SCHEDULERS, ModelNotFoundError, SchedulerSpec,
                      load_pipeline, make_scheduler, model_defaults, model_identity, offline,
                      resolve_device, resolve_dtype, resolve_model, scheduler_from_a1111, scheduler_name)


class NonFiniteImageError(XattnError, ArithmeticError):
    """Sampling produced NaN or infinite pixels: the settings overflowed the model's number range."""


# -- generating -----------------------------------------------------------------------

def image_seeds(seed: int, count: int) -> list[int]:
    """Seeds of ``count`` images of one call: ``seed, seed + 1, ...`` (A1111's convention), each in range."""
    return [validate_seed(seed + index, "seed of an image (seed + index)") for index in range(count)]


def generate(pipe, prompts: str | Sequence[str], *, seed: int, steps: int, guidance: float,
             size: int | str | Sequence[int] | None = None, num_images_per_prompt: int = 1,
             **pipeline_kwargs) -> list:
    """Run ``pipe`` and return PIL images, reproducibly.

    Each image gets its own CPU ``torch.Generator`` seeded ``seed + index``
    (index counts images over all prompts), so one image can be regenerated
    alone from its seed, and CPU results are bit-identical run to run.

    Args:
        pipe: a pipeline from :func:`load_pipeline` (or any diffusers SD pipeline).
        prompts: one prompt or a list.
        seed: seed of the first image.
        steps: number of inference steps.
        guidance: classifier-free guidance scale.
        size: ``64``, ``"512x768"`` (width x height) or None for the model's default.
        num_images_per_prompt: images per prompt.
        **pipeline_kwargs: passed to the pipeline call (``negative_prompt``, ...).
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise OptionError("no prompt given; pass at least one prompt")
    if steps <= 0:
        raise OptionError(f"steps must be a positive integer, not {steps}")
    count = len(prompt_list) * num_images_per_prompt
    generators = [torch.Generator("cpu").manual_seed(s) for s in image_seeds(int(seed), count)]
    kwargs = dict(pipeline_kwargs)
    dims = parse_size(size)
    if dims is not None:
        kwargs["width"], kwargs["height"] = dims
        at_asked_size(pipe, kwargs)  # PixArt/Sana: the size asked for, not the nearest bin
    # "np" then the pipeline's own numpy_to_pil: the same pixels as output_type="pil", but NaN is still visible.
    if "prompt_embeds" in kwargs:  # prompts encoded by xattn.prompts (weights, BREAK, past 75 tokens)
        prompt_list = None
    from ..prompts.pipeline import call  # runs a prompt schedule (A1111's prompt editing) that prompt_kwargs made

    arrays = call(
        pipe, prompt=prompt_list, num_inference_steps=int(steps), guidance_scale=float(guidance),
        num_images_per_prompt=num_images_per_prompt, generator=generators, output_type="np", **kwargs,
    ).images
    check_finite(arrays, seed=int(seed), guidance=guidance)
    return list(pipe.numpy_to_pil(arrays))


def check_finite(arrays, *, seed: int, guidance: float) -> None:
    """Refuse images holding NaN or infinity: they would be saved as black pixels, silently."""
    import numpy as np

    bad = [index for index, array in enumerate(arrays) if not np.isfinite(array).all()]
    if bad:
        raise NonFiniteImageError(
            f"the image of seed {seed + bad[0]} holds NaN or infinite values (guidance {guidance}); the numbers "
            "overflowed the model's precision: use a smaller guidance or weight, or --dtype float32")


__all__ = ["CONTROLNET_PIPELINES", "DEFAULTS_FILE", "DEVICES", "DTYPES", "SCHEDULERS", "AdapterError", "Adapters",
           "ModelNotFoundError", "NonFiniteImageError", "SchedulerSpec", "adapter_call_kwargs", "apply_loras",
           "attach_adapters", "check_finite", "generate", "image_seeds", "load_pipeline", "make_scheduler",
           "model_defaults", "model_identity", "native_size", "offline", "read_adapters", "resolve_device",
           "resolve_dtype", "resolve_model", "scheduler_from_a1111", "scheduler_name"]

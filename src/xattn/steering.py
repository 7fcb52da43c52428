"""Steering: controllers that change the latents before a step's denoiser call.

Guidance methods (Attend-and-Excite, binding and layout losses) read the
attention maps of the current latents, take a gradient step on the latents,
and only then let the step run. diffusers pipelines have no hook "before the
denoiser call", so the session does it from the denoiser's own forward
pre-hook, at the first call of each step:

1. the pipeline's latents tensor (the one its scheduler will step) is known:
   from ``prepare_latents`` for step 0, from the step-end callback after;
2. the controller's :meth:`~xattn.Controller.before_step` gets a
   :class:`Steer`: the latents, the timestep, and ``denoise(latents)``, which
   runs the denoiser on the conditional rows with this call's conditioning and
   only that controller's hooks (and those of controllers whose ``conditions``
   is set: a prompt schedule's text of the step), with gradients (or on some of those rows:
   a refinement need not denoise again an image that reached its target);
3. what it returns is copied into the pipeline's latents, in place, and the
   call's input rows are rebuilt from them, so the denoiser and the
   scheduler both see the steered latents.

A steering pass need not run the whole denoiser: a controller that only
reads maps raises :class:`EnoughRead` from its hook once it has read the
last one, and ``denoise`` returns None. Nothing after that site can change
what was read, so its gradients are the same; on a Stable Diffusion UNet,
whose 16x16 maps end in the second up block, this skips the two largest
blocks of the forward pass.

Row ``r`` of the denoiser batch is latent ``prompt * images + image`` of its
:class:`~xattn.Row`, scaled by the scheduler's ``scale_model_input``: this is
checked on every steered call, and a pipeline whose input is built otherwise
is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .hookpoints import BatchLayout
from .lifecycle import LifecycleError


class EnoughRead(Exception):
    """Raised by a steering controller's hook when its pass has read all it needs: the pass stops there."""


def latent_rows(layout: BatchLayout) -> list[int]:
    """For each row of the denoiser batch, the index of its latent in the pipeline's latents."""
    images = layout.images_per_prompt
    return [row.prompt * images + row.image for row in layout.rows]


def rows_of(value, rows: list[int], batch: int):
    """``value`` restricted to ``rows`` where it is per-row (first dim == batch), recursively in dicts."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {key: rows_of(item, rows, batch) for key, item in value.items()}
    return value


def rows_layout(layout: BatchLayout, rows: list[int]) -> BatchLayout:
    """``layout`` with only ``rows`` (its prompts and token maps kept)."""
    return BatchLayout(rows=tuple(layout.rows[r] for r in rows), prompts=layout.prompts,
                       token_maps=layout.token_maps, negative_prompts=layout.negative_prompts)


@dataclass
class Steer:
    """What a steering controller gets before a step: latents, timestep and a way to denoise them."""

    step: int
    timestep: torch.Tensor
    latents: torch.Tensor  # [n, C, H, W]: a detached copy of the pipeline's latents
    layout: BatchLayout  # the rows ``denoise`` runs: the conditional rows of this call
    denoise: Callable[..., object]  # (latents [n, C, H, W], rows=None) -> denoiser output on those rows,
    # or None when the controller's hook stopped the pass early (EnoughRead)


def steered_sample(sample: torch.Tensor, latents: torch.Tensor, scale, layout: BatchLayout,
                   pipeline: str, index: list[int] | None = None) -> torch.Tensor:
    """The denoiser input rebuilt from ``latents`` (row r from latent ``index[r]``, by default
    :func:`latent_rows`); refuses an input that was not built this way."""
    channels = latents.shape[1]
    index = latent_rows(layout) if index is None else index
    if sample.ndim != latents.ndim or sample.shape[1] < channels or max(index) >= latents.shape[0]:
        raise LifecycleError(f"guidance cannot steer {pipeline}: its denoiser input {tuple(sample.shape)} is not "
                             f"built from its latents {tuple(latents.shape)} row by row")
    return torch.cat([scale(latents)[index], sample[:, channels:]], dim=1)


def check_built_from(sample: torch.Tensor, latents: torch.Tensor, scale, layout: BatchLayout, pipeline: str) -> None:
    rebuilt = steered_sample(sample, latents, scale, layout, pipeline)
    if not torch.allclose(rebuilt, sample, rtol=1e-4, atol=1e-5):
        raise LifecycleError(f"guidance cannot steer {pipeline}: its denoiser input is not its latents, "
                             "row by row, as xattn expects")


def steer(module, arguments, name: str, timestep, step: int, layout: BatchLayout, latents: torch.Tensor | None,
          scheduler, controllers: list, steering_pass, pipeline: str) -> torch.Tensor | None:
    """Let each steering controller change ``latents`` before this call; the rebuilt input, or None.

    ``arguments`` is the denoiser call's ``BoundArguments`` (``name``: its
    latent input); ``steering_pass(controller, layout)`` tells the session
    whose hooks run (and with which rows) while that controller denoises.
    """
    if latents is None:
        raise LifecycleError(f"{pipeline} did not show xattn its latents (no prepare_latents or step-end "
                             "callback), so guidance cannot steer it")
    scale = (lambda z: scheduler.scale_model_input(z, timestep)) if hasattr(scheduler, "scale_model_input") \
        else (lambda z: z)
    sample, batch = arguments.arguments[name], layout.batch_size
    check_built_from(sample, latents, scale, layout, pipeline)
    cond = layout.cond_rows()
    cond_layout = rows_layout(layout, cond)
    others = {key: rows_of(value, cond, batch) for key, value in arguments.arguments.items() if key != name}
    cond_sample = sample[cond]

    cond_index = latent_rows(cond_layout)
    current = {}  # the steering controller whose pass runs

    def denoise(z: torch.Tensor, rows: list[int] | None = None):
        if rows is None:  # every conditional row
            layout_now, sample_now, index, rest = cond_layout, cond_sample, cond_index, others
        else:  # some of them: a refinement's images still above their target
            rows = list(rows)
            if not rows or min(rows) < 0 or max(rows) >= len(cond):
                raise LifecycleError(f"a steering pass denoises rows among 0..{len(cond) - 1}, not {rows}")
            layout_now = rows_layout(cond_layout, rows)
            sample_now, index = cond_sample[rows], [cond_index[r] for r in rows]
            rest = {key: rows_of(value, rows, len(cond)) for key, value in others.items()}
        steering_pass(current["controller"], layout_now)
        inputs = steered_sample(sample_now, z, scale, layout_now, pipeline, index=index)
        try:
            out = module(**{name: inputs, **rest})
        except EnoughRead:
            return None
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)

    steered, changed = latents.detach().clone(), False
    try:
        for controller in controllers:
            current["controller"] = controller
            with torch.enable_grad():  # pipelines sample under no_grad; guidance needs the graph
                out = controller.before_step(Steer(step, timestep, steered, cond_layout, denoise))
            if out is not None:
                steered, changed = out.detach(), True
    finally:
        steering_pass(None, None)
    if not changed:
        return None
    latents.copy_(steered)  # the pipeline's own tensor: its scheduler steps the steered latents
    return steered_sample(sample, latents, scale, layout, pipeline)


__all__ = ["EnoughRead", "Steer", "check_built_from", "latent_rows", "rows_layout", "rows_of", "steer",
           "steered_sample"]

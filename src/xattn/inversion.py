"""Inversion of a real image for editing: the noise and per-step latents from which the model regenerates it.

Three methods share one DDIM inversion (Song et al. 2021, run backwards with
the conditional noise prediction, as in Mokady et al. 2023) and differ in how
the image is regenerated:

- ``ddim``: plain regeneration; exact up to the inversion's approximation
  (the noise is predicted at the less noisy latent), good at guidance 1;
- ``negative-prompt``: the source prompt is also the negative prompt, so the
  source row's guided prediction is its conditional one at any guidance
  (Miyake et al. 2023, "Negative-prompt inversion");
- ``direct``: after each step the source rows are put back on the inverted
  trajectory, so they follow it exactly at any guidance and the target rows
  read the source's true attention (Ju et al. 2024, "PnP inversion");
- ``null-text``: the unconditional embedding is optimised at each step so
  that guided sampling lands on the inverted latents (Mokady et al. 2023,
  "Null-text inversion"); it costs an optimisation per step.

    inv = xattn.invert(pipe, "photo.png", "a red circle and a blue square", method="direct")
    inv.reconstruct()                                        # the image again (its VAE encode-decode)
    edit(pipe, inv.prompt, "a green circle and a blue square", inversion=inv, blend=["circle"])

The image must have the size the pipeline samples (``size=``, default the
model's own); another size is refused (:class:`InversionError`), never resized
silently. A prompt that does not describe the image still inverts and
reconstructs just as well (``direct`` exactly), but its words' maps then fall
anywhere, so edits made from it are unpredictable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import XattnError
from .hookpoints import Controller, Run
from .selector import Selector

METHODS = ("ddim", "negative-prompt", "direct", "null-text")


class InversionError(XattnError, ValueError):
    """An image, prompt or pipeline that cannot be inverted as asked (wrong size, unknown method, scheduler)."""


def _rgb(image) -> Any:
    """A PIL RGB image from a path, a PIL image or a uint8 array; transparency is laid over white."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InversionError(f"no image file at {path}")
        image = Image.open(path)
        image.load()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InversionError(f"an image array must be uint8 [H, W] or [H, W, C], not {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise InversionError(f"invert takes a path, a PIL image or a uint8 array, not {type(image).__name__}")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _size(pipe, size) -> tuple[int, int]:
    from .validate import parse_size

    dims = parse_size(size)
    if dims is None:
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        dims = (side, side)
    return dims


def _check_scheduler(pipe) -> None:
    from diffusers import DDIMScheduler

    scheduler = pipe.scheduler
    if type(scheduler) is not DDIMScheduler:
        raise InversionError(f"inversion needs a DDIMScheduler, not {type(scheduler).__name__}; set "
                             "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    config = scheduler.config
    if config.clip_sample or config.thresholding:
        raise InversionError("inversion needs a DDIM scheduler without clip_sample or thresholding "
                             "(they clip the regenerated sample, so it cannot follow the inversion)")
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise InversionError(f"inversion does not know prediction_type {config.prediction_type!r}")


def encode(pipe, image) -> torch.Tensor:
    """``[1, C, h, w]``: the VAE's latent (its mean, scaled) of a PIL RGB image."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    vae = pipe.vae
    with torch.no_grad():
        latent = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


def decode(pipe, latents: torch.Tensor) -> list:
    """PIL images of latents ``[n, C, h, w]`` (the pipeline's own decoding)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def _conditioning(pipe, prompt: str, width: int, height: int) -> tuple[torch.Tensor, dict]:
    """The denoiser's text input for ``prompt`` alone, as the pipeline builds it (SD 1.x/2.x, SDXL)."""
    device = pipe.device
    if hasattr(pipe, "text_encoder_2"):  # SDXL: pooled text and size ids go in added_cond_kwargs
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                     text_encoder_projection_dim=projection).to(device)
        return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    return embeds, {}


def _alpha(scheduler, timestep: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod


def _eps_and_x0(scheduler, output, sample, alpha, alpha_model):
    """Noise and clean latent from the model output (``alpha_model``: the noise level the model was told)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = output
    elif kind == "v_prediction":
        eps = alpha_model.sqrt() * output + (1 - alpha_model).sqrt() * sample
    else:  # "sample"
        eps = (sample - alpha_model.sqrt() * output) / (1 - alpha_model).sqrt()
    return eps, (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def ddim_trajectory(pipe, latent: torch.Tensor, prompt: str, steps: int, width: int, height: int) -> torch.Tensor:
    """``[steps + 1, C, h, w]``: DDIM inversion of ``latent``, noisiest first; row ``steps`` is ``latent``.

    Row ``i`` is what sampling step ``i`` starts from; the noise at step ``i`` is
    predicted at row ``i + 1`` with step ``i``'s timestep (Mokady et al. 2023).
    """
    scheduler = pipe.scheduler
    scheduler.set_timesteps(int(steps), device=pipe.device)
    timesteps = [int(t) for t in scheduler.timesteps]
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # as DDIMScheduler.step
    embeds, extra = _conditioning(pipe, prompt, width, height)
    path = [latent.float()]
    x = latent.float()
    with torch.no_grad():
        for t in reversed(timesteps):
            alpha_from, alpha_to = _alpha(scheduler, t - stride), _alpha(scheduler, t)
            output = pipe.unet(x.to(pipe.unet.dtype), t, encoder_hidden_states=embeds, **extra).sample.float()
            eps, x0 = _eps_and_x0(scheduler, output, x, alpha_from, alpha_to)
            x = alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps
            path.append(x)
    return torch.cat(path[::-1])


class FollowInversion(Controller):
    """Direct inversion (Ju et al. 2024): after each step the source rows take the inverted latent.

    Ju et al. add the gap between the inverted and the regenerated latent to
    the source branch; the sum is the inverted latent, which is set exactly.
    """

    selector = Selector(kind="cross")

    def __init__(self, trajectory: torch.Tensor):
        self.trajectory = trajectory  # [steps + 1, C, h, w]
        self._images = 1

    def context(self, x: torch.Tensor, ctx) -> None:
        """Observes nothing (fused); it lets the session see the controller run at each call."""
        return None

    def begin_run(self, run: Run) -> None:
        steps = self.trajectory.shape[0] - 1
        if run.num_steps is not None and run.num_steps != steps:
            raise InversionError(f"the image was inverted with {steps} steps; sample with {steps}, not {run.num_steps}")
        self._images = run.layout.images_per_prompt

    def on_step_end(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Source rows (prompt 0: the first ``images`` latents, prompt-major) := inverted latent ``step + 1``."""
        followed = latents.clone()
        followed[: self._images] = self.trajectory[step + 1].to(latents.device, latents.dtype)
        return followed

    def to_dict(self) -> dict:
        return {"edit": "follow_inversion", "steps": self.trajectory.shape[0] - 1}

    def __repr__(self) -> str:
        return f"FollowInversion(steps={self.trajectory.shape[0] - 1})"


class NullText(Controller):
    """Null-text inversion (Mokady et al. 2023): the unconditional rows attend to step ``i``'s optimised embedding."""

    selector = Selector(kind="cross")

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings  # [steps, j, d]

    def context(self, x: torch.Tensor, ctx) -> torch.Tensor | None:
        rows = [r for r, row in enumerate(ctx.layout.rows) if not row.cond]
        if not rows or ctx.step is None:
            return None
        x = x.clone()
        x[rows] = self.embeddings[ctx.step].to(x.device, x.dtype)
        return x

    def to_dict(self) -> dict:
        return {"edit": "null_text", "steps": self.embeddings.shape[0]}


def null_text_embeddings(pipe, trajectory: torch.Tensor, prompt: str, guidance: float, width: int, height: int,
                         iterations: int = 10, lr: float = 1e-2) -> tuple[torch.Tensor, list[float]]:
    """``[steps, j, d]`` unconditional embeddings, one per step, and each step's final error (Mokady et al. 2023)."""
    if hasattr(pipe, "text_encoder_2"):
        raise InversionError("null-text inversion supports SD 1.x/2.x pipelines, not SDXL (its pooled text "
                             "embedding would need optimising too); use direct")
    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(trajectory.shape[0] - 1, device=pipe.device)
    timesteps = [int(t) for t in scheduler.timesteps]
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    cond, _ = _conditioning(pipe, prompt, width, height)
    uncond, _ = _conditioning(pipe, "", width, height)
    x, found, errors = trajectory[:1], [], []

    def step(eps_uncond, eps_cond, t):
        output = eps_uncond + guidance * (eps_cond - eps_uncond)
        alpha, alpha_prev = _alpha(scheduler, t), _alpha(scheduler, t - stride)
        eps, x0 = _eps_and_x0(scheduler, output, x, alpha, alpha)
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps

    for i, t in enumerate(timesteps):
        target = trajectory[i + 1 : i + 2]
        with torch.no_grad():
            eps_cond = unet(x, t, encoder_hidden_states=cond).sample
        null = uncond.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([null], lr=lr)
        with torch.enable_grad():
            for _ in range(iterations):
                loss = torch.nn.functional.mse_loss(step(unet(x, t, encoder_hidden_states=null).sample, eps_cond, t),
                                                    target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        uncond = null.detach()
        with torch.no_grad():
            x = step(unet(x, t, encoder_hidden_states=uncond).sample, eps_cond, t)
        errors.append(float((x - target).pow(2).mean()))
        found.append(uncond[0])
    return torch.stack(found), errors


@dataclass
class Inversion:
    """A real image inverted: its trajectory, and how to regenerate it.

    Attributes:
        prompt: the prompt it was inverted with (the source prompt of edits).
        method: one of :data:`METHODS`.
        trajectory: ``[steps + 1, C, h, w]`` latents, noisiest first; the last is the image's latent.
        image: the input, as RGB.
        width, height: the image size.
    """

    pipe: Any = field(repr=False)
    prompt: str
    method: str
    trajectory: torch.Tensor = field(repr=False)
    image: Any = field(repr=False)
    width: int
    height: int
    null_embeddings: torch.Tensor | None = field(default=None, repr=False)  # [steps, j, d] for null-text
    guidance: float | None = None  # null-text: the guidance its embeddings were optimised for

    @property
    def steps(self) -> int:
        return self.trajectory.shape[0] - 1

    @property
    def noise(self) -> torch.Tensor:
        """``[1, C, h, w]``: the latent sampling starts from."""
        return self.trajectory[:1]

    @property
    def latent(self) -> torch.Tensor:
        """``[1, C, h, w]``: the image's own latent (what reconstruction aims at)."""
        return self.trajectory[-1:]

    def controllers(self) -> list:
        """What the source branch needs during sampling (``direct``: :class:`FollowInversion`)."""
        if self.method == "null-text":
            if self.null_embeddings is None:
                raise InversionError("this inversion has no null-text embeddings: invert with method='null-text'")
            return [NullText(self.null_embeddings)]
        return [FollowInversion(self.trajectory)] if self.method == "direct" else []

    def negative_prompt(self) -> str | None:
        """The negative prompt of every row (``negative-prompt``: the source prompt), or None."""
        return self.prompt if self.method == "negative-prompt" else None

    def decoded(self):
        """The input through the VAE alone (encode, decode): the ceiling of any reconstruction."""
        return decode(self.pipe, self.latent)[0]

    def reconstruct(self, guidance: float | None = None, output_type: str = "pil", *, also=()):
        """The image regenerated from :attr:`noise` with the prompt (a PIL image, or ``[C, h, w]`` latents).

        ``guidance`` defaults to null-text's own, else 1. ``also``: more controllers
        for the call, after the method's own, e.g. a :class:`~xattn.Capture` for the
        word maps of the real image along its inverted trajectory (``direct``
        follows it exactly)::

            capture = xattn.Capture()
            inv.reconstruct(also=[capture])
            capture.maps().word("circle")
        """
        from .session import hooks

        if guidance is None:
            guidance = self.guidance if self.method == "null-text" and self.guidance is not None else 1.0
        kwargs = {}
        if self.negative_prompt() is not None:
            kwargs["negative_prompt"] = self.negative_prompt()
        call = dict(prompt=self.prompt, latents=self.noise.to(self.pipe.device, self.pipe.unet.dtype),
                    num_inference_steps=self.steps, guidance_scale=float(guidance), width=self.width,
                    height=self.height, output_type=output_type, **kwargs)
        controllers = self.controllers() + list(also)
        if controllers:
            with hooks(self.pipe, *controllers):
                return self.pipe(**call).images[0]
        return self.pipe(**call).images[0]

    def to_dict(self) -> dict:
        return {"method": self.method, "prompt": self.prompt, "steps": self.steps,
                "size": f"{self.width}x{self.height}", "guidance": self.guidance}


def invert(pipe, image, prompt: str, *, method: str = "direct", steps: int = 25, size=None,
           guidance: float = 7.5) -> Inversion:
    """Invert a real image with DDIM so that it can be regenerated and edited.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` with a ``DDIMScheduler``.
        image: a path, a PIL image (any mode: converted to RGB, transparency over white) or a uint8 array.
        prompt: what the image shows; the source prompt of edits.
        method: ``"ddim"``, ``"negative-prompt"`` or ``"direct"``.
        steps: DDIM steps (sampling from the inversion must use as many).
        size: the size the image must have, ``64`` or ``"WxH"``; ``None``: the model's size.
        guidance: ``null-text`` only: the guidance its embeddings are optimised for (sample with the same).

    Raises:
        InversionError: unknown method, a non-DDIM scheduler, an image of another size than ``size``.
    """
    if method not in METHODS:
        raise InversionError(f"inversion method must be one of {', '.join(METHODS)}, not {method!r}")
    if not isinstance(prompt, str):
        raise InversionError(f"the inversion prompt must be a string, not {type(prompt).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InversionError(f"inversion steps must be a whole number >= 1, not {steps!r}")
    _check_scheduler(pipe)
    width, height = _size(pipe, size)
    factor = pipe.vae_scale_factor
    if width % factor or height % factor:
        raise InversionError(f"size {width}x{height} must be a multiple of the VAE's factor {factor}")
    rgb = _rgb(image)
    if rgb.size != (width, height):
        raise InversionError(f"the image is {rgb.size[0]}x{rgb.size[1]} but the pipeline samples {width}x{height}; "
                             f"xattn does not resize it for you: resize or crop it (image.resize(({width}, {height}))) "
                             "or pass size='WxH' (a multiple of the VAE's factor)")
    latent = encode(pipe, rgb)
    trajectory = ddim_trajectory(pipe, latent, prompt, steps, width, height)
    null = None
    if method == "null-text":
        null, _ = null_text_embeddings(pipe, trajectory, prompt, float(guidance), width, height)
    return Inversion(pipe, prompt, method, trajectory, rgb, width, height, null,
                     float(guidance) if method == "null-text" else None)


__all__ = ["METHODS", "FollowInversion", "Inversion", "InversionError", "NullText", "decode", "ddim_trajectory",
           "encode", "invert", "null_text_embeddings"]

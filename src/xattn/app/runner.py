"""Load a pipeline and generate images, the same way for every command.

Everything the CLI does goes through two functions here:

- :func:`load_pipeline` turns a model reference (a local folder, a Hub id in
  the local cache, or nothing for the embedded shapes-world model) into a
  diffusers pipeline on the requested device, dtype and scheduler. It only
  reads safetensors, never runs remote code, and never touches the network
  when ``HF_HUB_OFFLINE=1``.
- :func:`generate` runs the pipeline with one CPU ``torch.Generator`` per
  image, seeded ``seed + index``, so the same call gives the same pixels.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import XattnError
from ..validate import OptionError, parse_size
from ..validate import seed as validate_seed
from .modelfolder import ModelError, check_folder, read_index, read_object

DEFAULTS_FILE = "xattn_defaults.json"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(XattnError, FileNotFoundError):
    """A model reference that is neither a pipeline folder nor a cached Hub id."""


class NonFiniteImageError(XattnError, ArithmeticError):
    """Sampling produced NaN or infinite pixels: the settings overflowed the model's number range."""


@dataclass(frozen=True)
class SchedulerSpec:
    """A scheduler name of ours, the diffusers class it maps to, and A1111's name for it."""

    class_name: str
    a1111: str
    config: dict = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM"),
    "ddpm": SchedulerSpec("DDPMScheduler", "DDPM"),
    "pndm": SchedulerSpec("PNDMScheduler", "PLMS"),
    "lms": SchedulerSpec("LMSDiscreteScheduler", "LMS"),
    "euler": SchedulerSpec("EulerDiscreteScheduler", "Euler"),
    "euler-a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", "Heun"),
    "dpm++2m": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpm++2m-karras": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", "UniPC"),
}


# -- model references ---------------------------------------------------------------

def offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(reference: str) -> bool:
    """A reference that can only be a folder: a Hub id is exactly ``name`` or ``owner/name``."""
    return (
        reference.startswith((".", "/", "~")) or reference.count("/") > 1 or "\\" in reference
        or os.path.isabs(reference)
    )


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The local folder holding ``model``: a pipeline folder, or a Hub snapshot in the cache.

    Args:
        model: a folder with ``model_index.json``, a Hub id (``owner/name``) already
            in the local Hugging Face cache, ``None`` for the shapes-world model, or an
            embedded model's name (``"unet"``, ``"dit"``: see :data:`xattn.world.MODELS`).

    Raises:
        ModelNotFoundError: naming the reference and what would be accepted.
    """
    from ..world import MODELS, model_path

    if model is None or (str(model) in MODELS and not Path(str(model)).exists()):
        name = "unet" if model is None else str(model)
        try:
            return model_path(name)
        except FileNotFoundError as error:
            raise ModelNotFoundError(f"{'no --model given and ' if model is None else ''}{error}") from None
    reference = str(model)
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{reference!r} is a path but not a diffusers pipeline folder (no model_index.json in it); "
                "pass a folder saved with `save_pretrained` or a Hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
            )
        return path
    if _looks_like_path(reference):
        raise ModelNotFoundError(f"model folder {reference!r} does not exist")
    return _cached_snapshot(reference)


def _cached_snapshot(repo_id: str) -> Path:
    """The cached snapshot of a Hub pipeline; downloads only when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub id (owner/name)"
        ) from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if offline():
            raise ModelNotFoundError(
                f"model {repo_id!r} is not a local folder and not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 forbids downloading it; pass a pipeline folder, or download it "
                f"first with `hf download {repo_id}`"
            ) from None
    from diffusers import DiffusionPipeline

    try:
        # diffusers picks the files the pipeline needs (not every checkpoint in the repo).
        return Path(DiffusionPipeline.download(repo_id, use_safetensors=True, trust_remote_code=False))
    except Exception as error:  # network, auth, missing repo: all say the same to the user
        raise ModelNotFoundError(f"could not get model {repo_id!r} from the Hub: {error}") from None


def model_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """The model's own generation defaults (``xattn_defaults.json``), or ``{}``, in the CLI's names.

    ``guidance_scale`` becomes ``guidance``, ``num_inference_steps`` ``steps``,
    and ``width``/``height`` a ``size`` of ``"WxH"``.

    Args:
        path: the pipeline folder.
    """
    file = Path(path) / DEFAULTS_FILE
    if not file.is_file():
        return {}
    data = read_object(file)
    # The file may use diffusers' argument names; the CLI's names are the canonical ones.
    defaults = {_DEFAULT_ALIASES.get(key, key): value for key, value in data.items()
                if key not in ("height", "width")}
    if "size" not in defaults and ("height" in data or "width" in data):
        height = data.get("height", data.get("width"))
        defaults["size"] = f"{data.get('width', height)}x{height}"
    return defaults


_DEFAULT_ALIASES = {"guidance_scale": "guidance", "num_inference_steps": "steps"}


def model_identity(model: str | os.PathLike | None, path: Path) -> dict[str, Any]:
    """What to record about a model: the reference given, its folder, the Hub revision if known."""
    identity: dict[str, Any] = {"model": str(model) if model is not None else "shapes-world", "path": str(path)}
    # A Hub cache snapshot lives in .../snapshots/<commit hash>/.
    if path.parent.name == "snapshots" and len(path.name) == 40:
        identity["revision"] = path.name
    if (path / "model_index.json").is_file():
        identity["pipeline_class"] = read_index(path).get("_class_name")
    return identity


# -- device, dtype, scheduler ------------------------------------------------------

def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if device != "auto":
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError):
            parsed = None
        if parsed is None or parsed.type not in DEVICES:
            raise OptionError(f"device {device!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    mps = getattr(torch.backends, "mps", None)
    if device.startswith("mps") and not (mps is not None and mps.is_available()):
        raise OptionError(f"device {device!r} was asked for but MPS (Apple GPU) is not available here; "
                          "use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (the usual inference precision) and float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise OptionError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def make_scheduler(name: str, base_config):
    """A diffusers scheduler named by our short ``name``, built from the model's own config."""
    import diffusers

    spec = SCHEDULERS.get(name)
    if spec is None:
        raise OptionError(f"scheduler {name!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, spec.class_name).from_config(base_config, **spec.config)


def scheduler_name(scheduler) -> str | None:
    """Our short name for a scheduler instance, or None when we have none for it."""
    class_name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for name, spec in SCHEDULERS.items():
        if spec.class_name == class_name and bool(spec.config.get("use_karras_sigmas", False)) == karras:
            return name
    return None


def scheduler_from_a1111(sampler: str) -> str:
    """Our short scheduler name for an A1111 ``Sampler:`` value (e.g. ``Euler a``)."""
    for name, spec in SCHEDULERS.items():
        if spec.a1111.lower() == sampler.strip().lower() or name == sampler.strip().lower():
            return name
    raise OptionError(f"sampler {sampler!r} has no xattn scheduler; known: {', '.join(s.a1111 for s in SCHEDULERS.values())}")


# -- loading --------------------------------------------------------------------------

def _pipeline_class(path: Path):
    import diffusers

    class_name = check_folder(path)["_class_name"]
    if class_name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        return getattr(diffusers, class_name)
    return diffusers.DiffusionPipeline


def _absent_components(path: Path) -> dict[str, None]:
    """Components the folder records as absent (``[null, null]``), such as SD3's T5 left out.

    diffusers skips them and then refuses the folder unless each is passed as None.
    """
    index = check_folder(path)
    return {name: None for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and entry and all(e is None for e in entry)}


def load_pipeline(model: str | os.PathLike | None = None, *, device: str = "auto", dtype: str = "auto",
                  scheduler: str | None = None, progress: bool = False):
    """Load a diffusers pipeline, ready to generate.

    Args:
        model: pipeline folder, cached Hub id, or ``None`` for the shapes-world model.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        dtype: ``auto`` (float16 on CUDA, float32 otherwise), ``float32``, ``float16``, ``bfloat16``.
        scheduler: a key of :data:`SCHEDULERS` (``ddim``, ``euler-a``...), or None to keep the model's.
        progress: show diffusers' per-step progress bar.

    Raises:
        ModelNotFoundError: the model is not there (no download attempt offline).
        ModelError: a folder xattn will not load (pickles only, custom code, not text-to-image).
        OptionError: a bad device, dtype or scheduler name.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise OptionError(f"scheduler {scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    path = resolve_model(model)
    cls = _pipeline_class(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")  # renamed `dtype` in new diffusers
        try:
            pipe = cls.from_pretrained(
                path, torch_dtype=torch_dtype, use_safetensors=True, local_files_only=True,
                trust_remote_code=False, **_absent_components(path),
            )
        except (OSError, json.JSONDecodeError) as error:  # a missing or unreadable file in the folder
            raise ModelError(f"could not load the pipeline in {path}: {error}") from None
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe = pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    pipe.xattn_identity = model_identity(model, path)  # what manifests and PNG metadata record
    return pipe


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
    # "np" then the pipeline's own numpy_to_pil: the same pixels as output_type="pil", but NaN is still visible.
    if "prompt_embeds" in kwargs:  # prompts encoded by xattn.prompts (weights, BREAK, past 75 tokens)
        prompt_list = None
    arrays = pipe(
        prompt=prompt_list, num_inference_steps=int(steps), guidance_scale=float(guidance),
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

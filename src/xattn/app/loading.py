"""Turn a model reference into a ready diffusers pipeline: where it lives, what it is, on which device.

A reference is a local pipeline folder, a Hub id already in the local cache, a
single ``.safetensors`` checkpoint (with a config folder), or nothing for the
embedded shapes-world model. Loading reads safetensors only, never runs remote
code, and never touches the network when ``HF_HUB_OFFLINE=1``. Schedulers are
named as on the command line (``euler-a``) and mapped to A1111's names for PNGs.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import XattnError
from ..validate import OptionError
from .modelfolder import ModelError, check_folder, read_index, read_object

DEFAULTS_FILE = "xattn_defaults.json"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(XattnError, FileNotFoundError):
    """A model reference that is neither a pipeline folder nor a cached Hub id."""


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
    if path.is_file():  # a single-file checkpoint (A1111 / ComfyUI style)
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{reference!r} is a {path.suffix or 'suffix-less'} file; xattn loads single-file "
                             "checkpoints only as .safetensors (pickle checkpoints can run code)")
        return path
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


# -- single-file checkpoints -------------------------------------------------------------

def _single_file_config(checkpoint: Path, config_folder: str | os.PathLike | None) -> Path:
    """The diffusers pipeline folder whose configs and tokenizers describe ``checkpoint``, read offline.

    ``config_folder`` when given; else the Hub repo diffusers infers from the checkpoint's keys, if it is
    in the local cache. diffusers itself would download that repo's configs (even with
    ``local_files_only=True``), so xattn never lets it look.
    """
    if config_folder is not None:
        folder = Path(config_folder).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(f"--config-folder {str(config_folder)!r} is not a diffusers pipeline folder "
                                     "(no model_index.json in it)")
        return folder
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file

    try:
        repo = fetch_diffusers_config(load_file(str(checkpoint)))["pretrained_model_name_or_path"]
    except Exception as error:  # a damaged file, or keys of no architecture diffusers knows
        raise ModelError(f"{checkpoint}: diffusers cannot tell which architecture this checkpoint is ({error}); "
                         "pass --config-folder FOLDER, a diffusers pipeline folder of the same architecture") from None
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends)
        raise ModelNotFoundError(
            f"{checkpoint} is a single-file checkpoint of {repo}'s architecture; xattn loads it offline with that "
            f"pipeline's configs and tokenizers, which are not in the local cache: pass --config-folder FOLDER, a "
            f"diffusers pipeline folder of the same architecture (only its JSON configs and tokenizer files are "
            f"read; get them with `hf download {repo} --include '*.json' '*.txt'` and pass the folder it prints)"
        ) from None


def _load_single_file(checkpoint: Path, config_folder, torch_dtype):
    """``from_single_file`` with a local config folder, safetensors only, offline."""
    import diffusers

    config = _single_file_config(checkpoint, config_folder)
    class_name = check_folder(config)["_class_name"]
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ModelError(f"{config} holds a {class_name}, which diffusers cannot load from a single file")
    extra = {name: None for name in ("safety_checker", "feature_extractor", "image_encoder")
             if name in read_index(config)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        try:
            pipe = cls.from_single_file(str(checkpoint), config=str(config), local_files_only=True,
                                        torch_dtype=torch_dtype, **extra)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"could not load {checkpoint} with the configs of {config} (another "
                             f"architecture?): {first}") from None
    return pipe, config


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
                  scheduler: str | None = None, progress: bool = False,
                  config_folder: str | os.PathLike | None = None):
    """Load a diffusers pipeline, ready to generate.

    Args:
        model: pipeline folder, cached Hub id, or ``None`` for the shapes-world model.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        dtype: ``auto`` (float16 on CUDA, float32 otherwise), ``float32``, ``float16``, ``bfloat16``.
        scheduler: a key of :data:`SCHEDULERS` (``ddim``, ``euler-a``...), or None to keep the model's.
        progress: show diffusers' per-step progress bar.
        config_folder: for a single-file ``.safetensors`` checkpoint, a diffusers pipeline folder of the
            same architecture whose configs and tokenizers are read (default: the architecture's Hub repo,
            if it is in the local cache; never downloaded).

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
    if path.is_file():
        pipe, config = _load_single_file(path, config_folder, torch_dtype)
        return _ready(pipe, scheduler, torch_device, progress,
                      {**model_identity(model, path), "single_file": True, "config_folder": str(config),
                       "pipeline_class": type(pipe).__name__})
    if config_folder is not None:
        raise OptionError(f"--config-folder is for a single-file .safetensors --model; {path} is a pipeline folder "
                          "with its own configs")
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
    return _ready(pipe, scheduler, torch_device, progress, model_identity(model, path))


def _ready(pipe, scheduler, torch_device, progress: bool, identity: dict):
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe = pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    pipe.xattn_identity = identity  # what manifests and PNG metadata record
    return pipe

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
from typing import Any, Mapping, Sequence

import torch

from ..adapters import at_asked_size
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


# -- ControlNets and IP-Adapters from local folders -----------------------------------

# The ControlNet pipeline of each base pipeline class (the pipeline class switches when --controlnet is given).
CONTROLNET_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
}


class AdapterError(XattnError, ValueError):
    """A ControlNet or IP-Adapter option xattn cannot honour (a missing folder, a bad image, counts that differ)."""


@dataclass(frozen=True)
class Adapters:
    """The ``--controlnet`` / ``--ip-adapter`` options of a run, read and checked (no model loaded yet)."""

    controlnets: tuple[Path, ...] = ()
    control_images: tuple[Path, ...] = ()
    control_scales: tuple[float, ...] | None = None
    ip_adapter: Path | None = None  # the folder
    ip_weight: str | None = None  # the adapter's .safetensors file in it
    ip_images: tuple[Path, ...] = ()
    ip_scale: float | None = None

    def record(self) -> dict[str, Any]:
        """What the manifest's ``model`` records about them."""
        out: dict[str, Any] = {}
        if self.controlnets:
            out["controlnet"] = {"folders": [str(f) for f in self.controlnets],
                                 "images": [str(f) for f in self.control_images],
                                 "scales": list(self.control_scales) if self.control_scales else None}
        if self.ip_adapter is not None:
            out["ip_adapter"] = {"folder": str(self.ip_adapter), "weights": self.ip_weight,
                                 "images": [str(f) for f in self.ip_images], "scale": self.ip_scale}
        return out


def _paths(value: Any) -> tuple[Path, ...]:
    """``a,b`` (or a list from a config) as paths."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(Path(str(item).strip()).expanduser() for item in items if str(item).strip())


def _scales(value: Any, option: str) -> tuple[float, ...] | None:
    """``0.5,1`` as finite floats (float32 range), or None."""
    import math

    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    scales = []
    for item in items:
        try:
            number = float(str(item).strip())
        except ValueError:
            raise AdapterError(f"{option} {value!r}: {item!r} is not a number") from None
        if not math.isfinite(number) or abs(number) > 3.4e38:
            raise AdapterError(f"{option} {value!r}: {item!r} is not a finite number")
        scales.append(number)
    if not scales:
        raise AdapterError(f"{option} {value!r} holds no number")
    return tuple(scales)


def _safetensors_folder(folder: Path, what: str, weights: str) -> None:
    """Refuse a folder that is missing, has no config, or holds pickle weights only."""
    if not folder.exists():
        raise AdapterError(f"{what} folder {str(folder)!r} does not exist")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise AdapterError(f"{what} {str(folder)!r} is not a folder saved with `save_pretrained` (no config.json "
                           "in it); pass the folder that holds config.json and its .safetensors weights")
    if not (folder / weights).is_file():
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".ckpt", ".pth"))
        found = f"only pickle weights ({pickles[0]})" if pickles else f"no {weights}"
        raise AdapterError(f"{what} folder {folder} holds {found}; xattn loads safetensors only")


def _image_file(path: Path, option: str):
    """The image at ``path`` as RGB; a named error when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise AdapterError(f"{option} {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise AdapterError(f"{option} {str(path)!r} is not an image xattn can read ({error})") from None


def read_adapters(settings: Mapping[str, Any]) -> Adapters | None:
    """The ControlNet and IP-Adapter settings (``controlnet``, ``control_image``, ``control_scale``,
    ``ip_adapter``, ``ip_image``, ``ip_scale``), checked before any model loads; None when none is given.

    Raises:
        AdapterError: a missing folder or image, a folder without safetensors, more (or fewer) control
            images than ControlNets, a scale that is not a finite number, an option without its partner.
    """
    nets, images = _paths(settings.get("controlnet")), _paths(settings.get("control_image"))
    adapter, ip_images = settings.get("ip_adapter"), _paths(settings.get("ip_image"))
    control_scale, ip_scale = settings.get("control_scale"), settings.get("ip_scale")
    if not (nets or images or control_scale is not None or adapter or ip_images or ip_scale is not None):
        return None
    if (images or control_scale is not None) and not nets:
        raise AdapterError("--control-image and --control-scale need --controlnet FOLDER")
    if nets and not images:
        raise AdapterError("--controlnet needs --control-image PATH (one image per ControlNet, comma-separated)")
    if len(images) != len(nets):
        more = "more" if len(images) > len(nets) else "fewer"
        raise AdapterError(f"{len(images)} control image(s) for {len(nets)} ControlNet(s): {more} images than nets; "
                           "give one --control-image per --controlnet folder, in the same order")
    scales = _scales(control_scale, "--control-scale")
    if scales is not None and len(scales) not in (1, len(nets)):
        raise AdapterError(f"--control-scale gives {len(scales)} scales for {len(nets)} ControlNet(s); "
                           "give one scale, or one per ControlNet")
    for net in nets:
        _safetensors_folder(net, "ControlNet", "diffusion_pytorch_model.safetensors")
    for image in images:
        _image_file(image, "--control-image")
    if (ip_images or ip_scale is not None) and not adapter:
        raise AdapterError("--ip-image and --ip-scale need --ip-adapter FOLDER")
    folder, weight = None, None
    if adapter:
        if not ip_images:
            raise AdapterError("--ip-adapter needs --ip-image PATH (the image to condition on)")
        folder, weight = _ip_adapter_files(Path(str(adapter)).expanduser())
        for image in ip_images:
            _image_file(image, "--ip-image")
    ip = _scales(ip_scale, "--ip-scale")
    if ip is not None and len(ip) != 1:
        raise AdapterError(f"--ip-scale takes one number, not {ip_scale!r}")
    return Adapters(nets, images, scales, folder, weight, ip_images, ip[0] if ip else None)


def _ip_adapter_files(path: Path) -> tuple[Path, str]:
    """The folder and weight file of ``--ip-adapter``: a folder with one ``.safetensors`` (or that file)."""
    if not path.exists():
        raise AdapterError(f"IP-Adapter {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterError(f"IP-Adapter {path} is not a .safetensors file; xattn loads safetensors only")
        folder, weight = path.parent, path.name
    else:
        found = sorted(f.name for f in path.glob("*.safetensors"))
        if len(found) != 1:
            what = f"{len(found)} .safetensors files ({', '.join(found)})" if found else "no .safetensors file"
            raise AdapterError(f"IP-Adapter folder {path} holds {what}; pass a folder with one adapter file "
                               "(keys image_proj.* and ip_adapter.*) and its image_encoder/ folder, or the "
                               ".safetensors file itself")
        folder, weight = path, found[0]
    encoder = folder / "image_encoder"
    if encoder.is_dir() and not (encoder / "model.safetensors").is_file():
        raise AdapterError(f"{encoder} holds no model.safetensors; xattn loads safetensors only")
    return folder, weight


def native_size(pipe) -> tuple[int, int]:
    """(width, height) a pipeline makes when no size is given."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    side = int(sample) * int(scale)
    return side, side


def attach_adapters(pipe, adapters: Adapters, size: Any = None):
    """``pipe`` with the ControlNets (its ControlNet pipeline class) and the IP-Adapter loaded, on its device.

    Args:
        pipe: a pipeline from :func:`load_pipeline`.
        adapters: from :func:`read_adapters`.
        size: the run's ``--size`` (None: the model's native size): every control image must have it.

    Raises:
        AdapterError: a control image of another size, a base pipeline without a ControlNet pipeline or
            without a UNet (IP-Adapter), or adapter weights made for another base model.
    """
    base = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if adapters.controlnets:
        if base not in CONTROLNET_PIPELINES:
            raise AdapterError(f"--controlnet needs an SD 1.x / 2.x or SDXL pipeline; {base} has no ControlNet "
                               "pipeline that xattn loads")
        width, height = parse_size(size, max_pixels=None) if size else native_size(pipe)
        for path in adapters.control_images:
            image = _image_file(path, "--control-image")
            if image.size != (width, height):
                raise AdapterError(f"control image {path} is {image.size[0]}x{image.size[1]} but the run makes "
                                   f"{width}x{height} images; pass --size {image.size[0]}x{image.size[1]} or "
                                   "resize the image")
    if adapters.ip_adapter is not None and unet is None:
        raise AdapterError(f"--ip-adapter needs a UNet pipeline (SD 1.x / 2.x / SDXL); {base} has a "
                           f"{type(getattr(pipe, 'transformer', None)).__name__} instead")
    identity = dict(getattr(pipe, "xattn_identity", {}))
    if adapters.controlnets:
        pipe = _with_controlnets(pipe, adapters.controlnets, base)
    if adapters.ip_adapter is not None:
        _load_ip_adapter(pipe, adapters)
    pipe.xattn_identity = {**identity, "pipeline": type(pipe).__name__, **adapters.record()}
    return pipe


def _with_controlnets(pipe, folders: Sequence[Path], base: str):
    import diffusers

    nets = []
    for folder in folders:
        try:
            net = diffusers.ControlNetModel.from_pretrained(folder, torch_dtype=pipe.dtype, use_safetensors=True,
                                                           local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError) as error:
            raise AdapterError(f"could not load the ControlNet in {folder}: {error}") from None
        for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
            mine, theirs = getattr(net.config, key, None), getattr(pipe.unet.config, key, None)
            if mine is not None and list(_as_list(mine)) != list(_as_list(theirs)):
                raise AdapterError(f"ControlNet {folder} was made for another base model: its {key} is {mine}, "
                                   f"the UNet's {theirs}")
        nets.append(net)
    cls = getattr(diffusers, CONTROLNET_PIPELINES[base])
    made = cls.from_pipe(pipe, controlnet=nets[0] if len(nets) == 1 else nets)
    made.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return made.to(pipe.device)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _load_ip_adapter(pipe, adapters: Adapters) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        try:
            pipe.load_ip_adapter(str(adapters.ip_adapter), subfolder="", weight_name=adapters.ip_weight,
                                 local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise AdapterError(f"could not load the IP-Adapter in {adapters.ip_adapter} into this "
                               f"{type(pipe).__name__} (made for another base model?): {first}") from None
    if adapters.ip_scale is not None:
        pipe.set_ip_adapter_scale(adapters.ip_scale)
    pipe.to(pipe.device)


def adapter_call_kwargs(adapters: Adapters | None) -> dict[str, Any]:
    """The pipeline-call arguments of the adapters: control images and scales, the IP-Adapter's image."""
    if adapters is None:
        return {}
    kwargs: dict[str, Any] = {}
    if adapters.controlnets:
        images = [_image_file(path, "--control-image") for path in adapters.control_images]
        kwargs["image"] = images[0] if len(images) == 1 else images
        if adapters.control_scales is not None:
            scales = list(adapters.control_scales)
            if len(adapters.controlnets) > 1 and len(scales) == 1:
                scales = scales * len(adapters.controlnets)
            kwargs["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    if adapters.ip_adapter is not None:
        images = [_image_file(path, "--ip-image") for path in adapters.ip_images]
        kwargs["ip_adapter_image"] = images[0] if len(images) == 1 else [images]
    return kwargs


# -- LoRA tags ------------------------------------------------------------------------

def apply_loras(pipe, prompts: Sequence[str], folder: str | os.PathLike | None) -> list[dict]:
    """Load the ``<lora:name:weight>`` tags of ``prompts`` from ``folder`` and set their weights, as A1111 does.

    ``name`` is the file ``folder/name.safetensors`` (safetensors only). Every
    prompt of one call must name the same LoRAs at the same weights (they apply
    to the whole model). LoRAs loaded by an earlier call and not named now are
    switched off. Returns what was applied, for the manifest.

    Raises:
        OptionError: tags without ``folder``'s file, other extra networks, prompts that disagree.
    """
    from ..prompts.networks import network_tags

    tags = [[t for t in network_tags(p)] for p in prompts]
    for tag in (t for listed in tags for t in listed):
        if tag.kind != "lora":
            raise OptionError(f"<{tag.kind}:{tag.name}> is an extra network xattn does not load; only <lora:...> "
                              "tags are loaded (with --lora-dir)")
    wanted = [{t.name: t.weight for t in listed} for listed in tags]
    if any(w != wanted[0] for w in wanted):
        raise OptionError("the prompts of one call name different LoRAs or weights; a LoRA applies to the whole "
                          "model, so give every prompt of the call the same <lora:...> tags")
    loras = wanted[0] if wanted else {}
    loaded = set(getattr(pipe, "xattn_loras", ()))
    if not loras and not loaded:
        return []
    if loras and folder is None:
        return []  # the prompt parser removes the tags and warns
    for name in loras:
        if name in loaded:
            continue
        file = Path(folder).expanduser() / f"{name}.safetensors"
        if not file.is_file():
            raise OptionError(f"<lora:{name}> names {file}, which does not exist; xattn loads LoRAs from "
                              "NAME.safetensors in --lora-dir (safetensors only)")
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        loaded.add(name)
    pipe.xattn_loras = sorted(loaded)
    if loras:
        pipe.enable_lora()
        pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
    else:
        pipe.disable_lora()
    return [{"name": name, "weight": weight, "file": str(Path(folder).expanduser() / f"{name}.safetensors")}
            for name, weight in loras.items()]


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

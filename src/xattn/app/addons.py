"""ControlNets, IP-Adapters and LoRAs: the networks a run adds to its pipeline, from local safetensors.

``--controlnet`` / ``--ip-adapter`` options are read and checked before any
model loads (:func:`read_adapters`), attached to the loaded pipeline
(:func:`attach_adapters`, which switches to the ControlNet pipeline class),
and turned into the pipeline call's arguments (:func:`adapter_call_kwargs`).
A1111's ``<lora:name:weight>`` tags load ``name.safetensors`` from ``--lora-dir``
(:func:`apply_loras`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import XattnError
from ..validate import OptionError, parse_size


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


def _paths(value: Any, option: str) -> tuple[Path, ...]:
    """``a,b`` (or a list from a config) as paths; an empty item is refused, never skipped."""
    if value is None:
        return ()
    items = [str(item).strip() for item in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
    if not all(items):
        raise AdapterError(f"{option} has an empty path in {value!r}; give one path per item, comma-separated")
    return tuple(Path(item).expanduser() for item in items)


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
    nets, images = _paths(settings.get("controlnet"), "--controlnet"), _paths(settings.get("control_image"),
                                                                              "--control-image")
    adapter, ip_images = settings.get("ip_adapter"), _paths(settings.get("ip_image"), "--ip-image")
    if adapter is not None and not str(adapter).strip():
        raise AdapterError("--ip-adapter is empty; give the IP-Adapter's folder or .safetensors file")
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

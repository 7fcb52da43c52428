"""Putting xattn's processor on sites, and refusing what it does not reproduce.

xattn replaces a site's processor only where it computes *exactly* what the
old one did. That is known for an explicit list of diffusers classes
(:data:`REPRODUCED`); any other processor (IP-Adapter, Custom Diffusion,
xformers, attention slicing, a user's own, a subclass of a listed one) is
refused with an error that names the site, the class and what to do, before
anything is changed. Restoring puts back the very objects that were there.

Joint processors (SD3's ``JointAttnProcessor2_0``, Flux's ``FluxAttnProcessor``,
:data:`xattn.joint.JOINT_PROCESSORS`) are not reproduced but kept: a
:class:`~xattn.joint.JointProcessor` runs the stock object and takes over its
attention core only.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .errors import UnsupportedProcessorError

PROCESSOR_SUFFIX = ".processor"


def _reproduced() -> tuple[type, ...]:
    from diffusers.models import attention_processor as ap

    return tuple(getattr(ap, name) for name in ("AttnProcessor2_0", "AttnProcessor") if hasattr(ap, name))


REPRODUCED = _reproduced()

# What to tell a user who meets a known processor xattn does not reproduce.
_ADVICE = {
    "SlicedAttnProcessor": "attention slicing replaced it: call pipe.disable_attention_slicing() first "
                           "(xattn's fused path already avoids the [i, j] map)",
    "XFormersAttnProcessor": "xformers replaced it: call pipe.disable_xformers_memory_efficient_attention() first "
                             "(xattn's fused path uses PyTorch's SDPA, which picks a memory-efficient kernel)",
    "IPAdapterAttnProcessor": "IP-Adapter's decoupled attention is not reproduced yet: unload it "
                              "(pipe.unload_ip_adapter()) or deselect these sites",
    "IPAdapterAttnProcessor2_0": "IP-Adapter's decoupled attention is not reproduced yet: unload it "
                                 "(pipe.unload_ip_adapter()) or deselect these sites",
    "CustomDiffusionAttnProcessor": "Custom Diffusion's processor is not reproduced: deselect these sites",
    "CustomDiffusionAttnProcessor2_0": "Custom Diffusion's processor is not reproduced: deselect these sites",
    "FusedAttnProcessor2_0": "fused QKV projections are on: call pipe.unfuse_qkv_projections() first",
    "FusedJointAttnProcessor2_0": "fused QKV projections are on: call pipe.unfuse_qkv_projections() first",
}


def is_reproduced(processor) -> bool:
    """True when xattn's processor computes exactly what ``processor`` does (its exact class is listed)."""
    from .joint import JOINT_PROCESSORS, JointProcessor
    from .processor import XattnProcessor

    if type(processor) in JOINT_PROCESSORS:  # kept and run as is; context-parallel cores are not ours to replace
        return getattr(processor, "_parallel_config", None) is None
    return type(processor) in REPRODUCED or type(processor) in (XattnProcessor, JointProcessor)


def refusal(name: str, processor) -> str:
    """Why the site ``name`` cannot be hooked, in one line."""
    cls = type(processor).__name__
    advice = _ADVICE.get(cls, "deselect it (e.g. a selector with `sites=` that leaves it out) or restore "
                              "diffusers' AttnProcessor2_0 there")
    return f"site {name} has the attention processor {cls}, which xattn does not reproduce exactly; {advice}"


def hookable(model) -> dict[str, str | None]:
    """Site name -> None where xattn can hook it, else the processor class it refuses there."""
    from .sites import denoiser_of

    processors = denoiser_of(model).attn_processors
    return {key[: -len(PROCESSOR_SUFFIX)]: None if is_reproduced(processor) else type(processor).__name__
            for key, processor in processors.items()}


def check_processors(denoiser: nn.Module, names: Iterable[str]) -> None:
    """Raise :class:`UnsupportedProcessorError` for the first of ``names`` xattn cannot hook."""
    current = denoiser.attn_processors
    refused = [name for name in names if not is_reproduced(current[name + PROCESSOR_SUFFIX])]
    if refused:
        more = f" (and {len(refused) - 1} more site(s) like it)" if len(refused) > 1 else ""
        raise UnsupportedProcessorError(refusal(refused[0], current[refused[0] + PROCESSOR_SUFFIX]) + more)


def install(denoiser: nn.Module, names: Iterable[str], make, originals: dict) -> None:
    """Put ``make(name)`` on every site in ``names`` not yet xattn's; remember what was there in ``originals``.

    Where a joint processor was, ``make(name)``'s site and runtime go to a
    :class:`~xattn.joint.JointProcessor` that wraps it.
    """
    from .joint import JointProcessor, family_of
    from .processor import XattnProcessor

    names = list(names)
    check_processors(denoiser, names)
    current = denoiser.attn_processors
    changed = False
    for name in names:
        key = name + PROCESSOR_SUFFIX
        if isinstance(current[key], XattnProcessor):
            continue
        originals[key] = current[key]
        made = make(name)
        if family_of(current[key]) is not None:
            made = JointProcessor(made.site, made.runtime, current[key])
        current[key] = made
        changed = True
    if changed:
        denoiser.set_attn_processor(current)


def restore(denoiser: nn.Module, originals: dict) -> None:
    """Put back the processors recorded in ``originals``, and forget them."""
    if not originals:
        return
    current = denoiser.attn_processors
    current.update(originals)
    denoiser.set_attn_processor(current)
    originals.clear()


__all__ = ["REPRODUCED", "check_processors", "hookable", "install", "is_reproduced", "refusal", "restore"]

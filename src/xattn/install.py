"""Putting xattn's processor on sites, and refusing what it does not reproduce.

xattn replaces a site's processor only where it computes *exactly* what the
old one did. That is known for an explicit list of diffusers classes
(:data:`REPRODUCED`); any other processor (IP-Adapter, Custom Diffusion,
xformers, attention slicing, a user's own, a subclass of a listed one) is
refused with an error that names the site, the class and what to do, before
anything is changed. Restoring puts back the very objects that were there.

Joint processors (SD3's ``JointAttnProcessor2_0``, Flux's ``FluxAttnProcessor``) and
Sana's cross-attention processor (``SanaAttnProcessor2_0``), together
:data:`xattn.joint.JOINT_PROCESSORS`, are not reproduced but kept: a
:class:`~xattn.joint.JointProcessor` runs the stock object and takes over its
attention core only.

IP-Adapter processors (``IPAdapterAttnProcessor2_0``, ``IPAdapterAttnProcessor``)
are reproduced, image branch included, by
:class:`~xattn.ip_adapter.XattnIPAdapterProcessor`, where their model has the
IP image projection (:func:`xattn.ip_adapter.projection_problem`).
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
    "IPAdapterXFormersAttnProcessor": "xformers replaced IP-Adapter's processor: call "
                                      "pipe.disable_xformers_memory_efficient_attention() first",
    "CustomDiffusionAttnProcessor": "Custom Diffusion's processor is not reproduced: deselect these sites",
    "CustomDiffusionAttnProcessor2_0": "Custom Diffusion's processor is not reproduced: deselect these sites",
    "FusedAttnProcessor2_0": "fused QKV projections are on: call pipe.unfuse_qkv_projections() first",
    "FusedJointAttnProcessor2_0": "fused QKV projections are on: call pipe.unfuse_qkv_projections() first",
}


def is_reproduced(processor, host=None) -> bool:
    """True when xattn's processor computes exactly what ``processor`` does (its exact class is listed).

    An IP-Adapter processor is reproduced where its model ``host`` has the IP
    image projection; without ``host`` it counts as reproduced.
    """
    from .ip_adapter import XattnIPAdapterProcessor, is_ip_processor, projection_problem
    from .joint import JOINT_PROCESSORS, JointProcessor
    from .processor import XattnProcessor

    if type(processor) in JOINT_PROCESSORS:  # kept and run as is; context-parallel cores are not ours to replace
        return getattr(processor, "_parallel_config", None) is None
    if is_ip_processor(processor):
        return host is None or projection_problem(host) is None
    return type(processor) in REPRODUCED or type(processor) in (XattnProcessor, JointProcessor, XattnIPAdapterProcessor)


def refusal(name: str, processor, host=None) -> str:
    """Why the site ``name`` cannot be hooked, in one line."""
    from .ip_adapter import is_ip_processor, projection_problem

    cls = type(processor).__name__
    advice = _ADVICE.get(cls, "deselect it (e.g. a selector with `sites=` that leaves it out) or restore "
                              "diffusers' AttnProcessor2_0 there")
    if is_ip_processor(processor) and host is not None:
        advice = projection_problem(host) or advice
    return f"site {name} has the attention processor {cls}, which xattn does not reproduce exactly; {advice}"


Hosts = dict[str, nn.Module]  # name prefix -> model owning processors (see xattn.sites.attention_hosts)


def hosts_of(target) -> Hosts:
    """A pipeline's or model's attention hosts; a hosts dict is returned as it is."""
    from .sites import attention_hosts

    return target if isinstance(target, dict) else attention_hosts(target)


def processors_of(target) -> dict[str, object]:
    """``"<site name>.processor"`` -> processor, over every host."""
    return {prefix + key: processor for prefix, host in hosts_of(target).items()
            for key, processor in host.attn_processors.items()}


def _owner(hosts: Hosts, key: str) -> str:
    """The prefix of the host that owns the full key ``key``."""
    return max((prefix for prefix in hosts if key.startswith(prefix)), key=len)


def _set_processors(hosts: Hosts, changes: dict[str, object]) -> None:
    """Set the processors in ``changes`` (full keys), each host in one ``set_attn_processor`` call."""
    by_host: dict[str, dict[str, object]] = {}
    for key, processor in changes.items():
        owner = _owner(hosts, key)
        by_host.setdefault(owner, {})[key[len(owner):]] = processor
    for prefix, mine in by_host.items():
        current = hosts[prefix].attn_processors
        current.update(mine)
        hosts[prefix].set_attn_processor(current)


def hookable(model) -> dict[str, str | None]:
    """Module name -> None where xattn can hook the site, else the processor class it refuses there.

    Modules that are not sites (linear attention: :func:`xattn.sites.not_sites`)
    are listed too, with a reason that starts with ``"not a site"``.
    """
    from .sites import linear_attention

    hosts = hosts_of(model)
    found = {}
    for key, processor in processors_of(hosts).items():
        skipped = linear_attention(processor)
        found[key[: -len(PROCESSOR_SUFFIX)]] = skipped or (
            None if is_reproduced(processor, hosts[_owner(hosts, key)]) else type(processor).__name__)
    return found


def check_processors(target, names: Iterable[str]) -> None:
    """Raise :class:`UnsupportedProcessorError` for the first of ``names`` xattn cannot hook."""
    hosts = hosts_of(target)
    current = processors_of(hosts)

    def host(name):
        return hosts[_owner(hosts, name + PROCESSOR_SUFFIX)]

    refused = [name for name in names if not is_reproduced(current[name + PROCESSOR_SUFFIX], host(name))]
    if refused:
        more = f" (and {len(refused) - 1} more site(s) like it)" if len(refused) > 1 else ""
        first = refused[0]
        raise UnsupportedProcessorError(refusal(first, current[first + PROCESSOR_SUFFIX], host(first)) + more)


def install(target, names: Iterable[str], make, originals: dict) -> None:
    """Put ``make(name)`` on every site in ``names`` not yet xattn's; remember what was there in ``originals``.

    Where a joint processor was, ``make(name)``'s site and runtime go to a
    :class:`~xattn.joint.JointProcessor` that wraps it; where an IP-Adapter
    processor was, to a :class:`~xattn.ip_adapter.XattnIPAdapterProcessor`
    that shares its weights and scales.
    """
    from . import ip_adapter
    from .joint import JointProcessor, family_of
    from .processor import XattnProcessor

    hosts, names = hosts_of(target), list(names)
    check_processors(hosts, names)
    current = processors_of(hosts)
    changes = {}
    for name in names:
        key = name + PROCESSOR_SUFFIX
        if isinstance(current[key], XattnProcessor):
            continue
        originals[key] = current[key]
        made = make(name)
        if family_of(current[key]) is not None:
            made = JointProcessor(made.site, made.runtime, current[key])
        elif ip_adapter.is_ip_processor(current[key]):
            made = ip_adapter.reproduce(made, current[key])
        changes[key] = made
    _set_processors(hosts, changes)


def restore(target, originals: dict) -> None:
    """Put back the processors recorded in ``originals``, and forget them."""
    if originals:
        _set_processors(hosts_of(target), dict(originals))
        originals.clear()


__all__ = ["REPRODUCED", "Hosts", "check_processors", "hookable", "hosts_of", "install", "is_reproduced",
           "processors_of", "refusal", "restore"]

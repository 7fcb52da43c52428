"""Every number a user gives, checked once, before any work: the CLI, configs, sweeps and PNGs use this.

A value that would run but mean nothing is refused here with a message
naming it: ``nan`` or ``inf`` guidance (a black image), a weight of ``1e39``
(finite in Python, infinite in float32), a seed outside the generator's range,
a size that would need more memory than the machine has, digits such as ``²``
that Python's ``int`` half accepts.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, Mapping, Sequence

from .errors import XattnError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1
MAX_STEPS = 10_000
MAX_IMAGES = 4096
MAX_SEEDS = 100_000  # seeds of one range: more is a typo, not a sweep
MAX_THREADS = 1024
DEFAULT_MAX_PIXELS = 2048 * 2048
# The VAE decoder's last stage holds about three float32 tensors of 128 channels at full image size.
_BYTES_PER_PIXEL = 3 * 128 * 4
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.I)


class OptionError(XattnError, ValueError):
    """An option (number, size, device, dtype, scheduler...) with a value xattn refuses."""


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``[low, high]``: an int, or ASCII digits (``²`` and ``1.5`` refused)."""
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name} must be a whole number written in digits 0-9, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise OptionError(f"{name} must be {bounds}, not {value}")
    return value


def number(value: Any, name: str) -> float:
    """``value`` as a float that stays finite in float32 (``nan``, ``inf`` and ``1e39`` refused)."""
    given = value.strip() if isinstance(value, str) else value
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            raise OptionError(f"{name} must be a number, not {value!r}")
        value = float(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name} must be a number, not {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise OptionError(f"{name} must be a finite number, not {given!r}")
    try:
        struct.pack("<f", result)  # C's double -> float rounding: 1e39 overflows, 3.40282356e38 does not
    except OverflowError:
        raise OptionError(f"{name} {given!r} is out of float32 range (about ±3.4e38): it would be infinite in the model") from None
    return result


def seed(value: Any, name: str = "seed") -> int:
    return integer(value, name, low=0, high=SEED_MAX)


def steps(value: Any, name: str = "steps") -> int:
    return integer(value, name, low=1, high=MAX_STEPS)


def guidance(value: Any, name: str = "guidance") -> float:
    return number(value, name)


def weight(value: Any, name: str = "weight") -> float:
    return number(value, name)


def threads(value: Any, name: str = "threads") -> int:
    return integer(value, name, low=1, high=MAX_THREADS)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} PB"  # pragma: no cover - the loop always returns


def parse_size(size: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = "size") -> tuple[int, int] | None:
    """``64`` -> (64, 64); ``"512x768"`` -> (512, 768) as (width, height); None stays None.

    Args:
        size: an int, ``"W"``, ``"WxH"`` or ``[W, H]``.
        max_pixels: the most pixels allowed (None: no limit); a larger size is
            refused with the memory it would need.
        name: what to call the value in messages.
    """
    if size is None:
        return None
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise OptionError(f"{name} {size!r} must be [width, height]")
        width, height = (integer(v, name) for v in size)
    elif isinstance(size, int) and not isinstance(size, bool):
        width = height = size
    elif isinstance(size, str):
        parts = size.strip().lower().split("x")
        if len(parts) not in (1, 2) or not all(_INTEGER.fullmatch(p.strip()) for p in parts):
            raise OptionError(f"{name} {size!r} must be one number (64) or WIDTHxHEIGHT (512x768), in digits 0-9")
        width, height = int(parts[0]), int(parts[-1])
    else:
        raise OptionError(f"{name} {size!r} must be one number (64) or WIDTHxHEIGHT (512x768)")
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise OptionError(f"{name} {width}x{height} must be positive multiples of 8 (the VAE downsamples by 8)")
    if max_pixels is not None and width * height > max_pixels:
        raise OptionError(
            f"{name} {width}x{height} is {width * height} pixels, over the limit of {max_pixels}; it would need "
            f"about {_human_bytes(width * height * _BYTES_PER_PIXEL)} for the VAE decoder alone; "
            f"pass --max-pixels {width * height} to try anyway")
    return width, height


def seed_list(value: Any, name: str = "seeds") -> list[int]:
    """The one seed-list parser: ``"0:4"`` -> [0, 1, 2, 3]; ``"3,7"``, ``[3, 7]``, ``5`` -> a list."""
    if isinstance(value, str) and ":" in value:
        start_text, _, stop_text = value.partition(":")
        start, stop = integer(start_text, name, low=0), integer(stop_text, name, low=0)
        if stop <= start:
            raise OptionError(f"{name} {value!r}: a range is START:STOP with STOP > START, e.g. 0:4")
        if stop - 1 > SEED_MAX:
            raise OptionError(f"{name} {value!r}: seeds go up to {SEED_MAX}")
        if stop - start > MAX_SEEDS:
            raise OptionError(f"{name} {value!r} holds {stop - start} seeds; at most {MAX_SEEDS} in one list")
        return list(range(start, stop))
    if isinstance(value, str):
        items: Sequence[Any] = [item for item in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        items = [value]
    if not items:
        raise OptionError(f"{name} is empty; give a range 0:4 or a list 0,3,7")
    if len(items) > MAX_SEEDS:
        raise OptionError(f"{name} holds {len(items)} seeds; at most {MAX_SEEDS} in one list")
    return [seed(item, name) for item in items]


def weight_list(value: Any, name: str = "weights") -> list[float]:
    """``"-1,0,0.5"`` or ``[-1, 0, 0.5]`` -> floats, each checked by :func:`weight`."""
    items = value.split(",") if isinstance(value, str) else (value if isinstance(value, (list, tuple)) else [value])
    if not items:
        raise OptionError(f"{name} is empty; give numbers such as 0,0.5,1,2")
    return [weight(item, name) for item in items]


# The settings every generating command shares, and their checks.
_SETTING_CHECKS = {"seed": seed, "steps": steps, "guidance": guidance, "threads": threads,
                   "images": lambda v, name: integer(v, name, low=1, high=MAX_IMAGES),
                   "max_pixels": lambda v, name: integer(v, name, low=64)}


PROMPT_SYNTAXES = ("a1111", "compel")  # xattn.prompts.SYNTAXES


def prompt_syntax(value: Any, name: str = "syntax") -> str:
    """A prompt dialect xattn reads: ``a1111`` or ``compel``."""
    if value not in PROMPT_SYNTAXES:
        raise OptionError(f"{name} must be one of {', '.join(PROMPT_SYNTAXES)}, not {value!r}")
    return value


def check_settings(settings: Mapping[str, Any], *, source: str = "") -> dict[str, Any]:
    """A copy of ``settings`` with every number checked (unset ones are left as they are).

    Args:
        settings: merged settings (``seed``, ``steps``, ``guidance``, ``size``...).
        source: where they came from (``"image.png: "``), put before messages.
    """
    cleaned = dict(settings)
    try:
        for key, check in _SETTING_CHECKS.items():
            if cleaned.get(key) is not None:
                cleaned[key] = check(cleaned[key], key)
        if cleaned.get("seed") is not None and cleaned.get("images") is not None:
            seed(cleaned["seed"] + cleaned["images"] - 1, "the last image's seed (seed + images - 1)")
        if cleaned.get("syntax") is not None:
            cleaned["syntax"] = prompt_syntax(cleaned["syntax"])
        for key in ("prompt", "negative_prompt", "source"):
            if cleaned.get(key) is not None:
                prompt_text(cleaned[key], key)
        for text in cleaned.get("target") or []:
            prompt_text(text, "target")
        if cleaned.get("size") is not None:
            max_pixels = cleaned.get("max_pixels") or DEFAULT_MAX_PIXELS
            width, height = parse_size(cleaned["size"], max_pixels=max_pixels)
            cleaned["size"] = f"{width}x{height}"
    except OptionError as error:
        raise OptionError(f"{source}{error}") from None
    return cleaned


def prompt_text(value: Any, name: str = "prompt") -> str:
    """A prompt as given, refused when it holds a NUL (no PNG text chunk or C string can carry it)."""
    if not isinstance(value, str):
        raise OptionError(f"{name} must be text, not {value!r}")
    if "\0" in value:
        raise OptionError(f"{name} holds a NUL character (\\0); remove it")
    return value


__all__ = ["OptionError", "FLOAT32_MAX", "SEED_MAX", "DEFAULT_MAX_PIXELS", "integer", "number", "seed", "steps",
           "guidance", "weight", "threads", "parse_size", "seed_list", "weight_list", "check_settings",
           "prompt_text", "prompt_syntax", "PROMPT_SYNTAXES"]

"""Generation parameters in a PNG ``parameters`` text chunk, in the A1111 format.

The text is what AUTOMATIC1111-style tools write and read::

    a red circle and a blue square
    Negative prompt: blurry
    Steps: 25, Sampler: DDIM, CFG scale: 5.0, Seed: 3, Size: 64x64, Model: shapes-world, xattn: "{...}"

Line one is the prompt (it may span lines), an optional ``Negative prompt:``
line follows, and the last line is ``key: value`` pairs; a value holding a
comma, colon or quote is written as a JSON string. xattn's own settings
(scheduler name, model reference, controller settings) ride in the ``xattn``
value as JSON, so :func:`read_parameters` gives back all that is needed to
regenerate the image.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import XattnError

CHUNK = "parameters"
_NEGATIVE = "Negative prompt: "
# One "Key: value" pair of the last line; A1111 parses it with the same pattern.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


class PngMetadataError(XattnError, ValueError):
    """A PNG without a readable ``parameters`` chunk."""


def _quote(value: Any) -> str:
    text = str(value)
    if any(ch in text for ch in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_parameters(*, prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int,
                      width: int, height: int, negative_prompt: str | None = None,
                      model: str | None = None, xattn: dict[str, Any] | None = None,
                      extra: dict[str, Any] | None = None) -> str:
    """The A1111 ``parameters`` text for one image.

    Args:
        prompt: the prompt as typed (weights syntax kept).
        steps: inference steps.
        sampler: A1111's sampler name (``DDIM``, ``Euler a``...).
        cfg_scale: guidance scale.
        seed: the image's own seed.
        width: image width in pixels.
        height: image height in pixels.
        negative_prompt: the negative prompt, if any.
        model: a model name for ``Model:``.
        xattn: xattn-specific settings, stored as JSON.
        extra: further ``Key: value`` pairs.
    """
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt or "")):
        if "\0" in text:
            raise PngMetadataError(f"the {name} holds a NUL character, which a PNG text chunk cannot carry")
    lines = [prompt]
    if negative_prompt:
        lines.append(_NEGATIVE + negative_prompt)
    pairs: dict[str, Any] = {
        "Steps": int(steps), "Sampler": sampler, "CFG scale": float(cfg_scale), "Seed": int(seed),
        "Size": f"{int(width)}x{int(height)}",
    }
    if model:
        pairs["Model"] = model
    pairs.update(extra or {})
    if xattn:
        pairs["xattn"] = json.dumps(xattn, sort_keys=True, separators=(",", ":"))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items()))
    return "\n".join(lines)


def image_parameters(pipe, settings: dict[str, Any], *, command: str, prompt: str, seed: int, image,
                     own: dict[str, Any] | None = None) -> str:
    """The ``parameters`` text of an image a command made with ``pipe`` and merged ``settings``.

    Args:
        pipe: the pipeline (its scheduler and ``xattn_identity`` are recorded).
        settings: merged settings (``model``, ``scheduler``, ``dtype``, ``steps``, ``guidance``...).
        command: the command that made it (``generate``, ``sweep``...).
        prompt: the prompt of this image.
        seed: this image's own seed.
        image: the PIL image (its size is recorded).
        own: command-specific settings (words, weights, the job...), stored under ``xattn``.
    """
    from .runner import SCHEDULERS, scheduler_name

    scheduler = settings.get("scheduler") or scheduler_name(pipe.scheduler)
    spec = SCHEDULERS.get(scheduler) if scheduler else None
    identity = getattr(pipe, "xattn_identity", None) or {}
    record = {"command": command, "model": settings.get("model"), "scheduler": scheduler,
              "dtype": settings.get("dtype"), **(own or {})}
    if identity.get("revision"):
        record["revision"] = identity["revision"]
    return format_parameters(
        prompt=prompt, negative_prompt=settings.get("negative_prompt"), steps=settings["steps"],
        sampler=spec.a1111 if spec else type(pipe.scheduler).__name__, cfg_scale=settings["guidance"],
        seed=seed, width=image.width, height=image.height, model=identity.get("model"), xattn=record)


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text into a dict.

    Returns keys ``prompt``, ``negative_prompt`` (or None), ``steps``, ``sampler``,
    ``cfg_scale``, ``seed``, ``width``, ``height``, ``model``, ``xattn`` (a dict),
    and ``pairs`` (every ``Key: value`` as text).

    Raises:
        PngMetadataError: the text has no ``Steps:`` line.
    """
    lines = text.rstrip("\n").split("\n")  # not lstrip: a prompt may begin with a newline
    if len(lines) < 2 or not lines[-1].lstrip().startswith("Steps:"):
        raise PngMetadataError("the parameters text has no final 'Steps: ...' line; it is not in the A1111 format")
    pairs = {key.strip(): _unquote(value) for key, value in _PAIR.findall(lines[-1])}
    body = lines[:-1]
    negative = None
    for index, line in enumerate(body):
        if line.startswith(_NEGATIVE):
            negative = "\n".join([line[len(_NEGATIVE):], *body[index + 1:]])
            body = body[:index]
            break
    try:
        width, height = (int(n) for n in pairs.get("Size", "0x0").split("x"))
        result: dict[str, Any] = {
            "prompt": "\n".join(body),
            "negative_prompt": negative,
            "steps": int(pairs["Steps"]),
            "sampler": pairs.get("Sampler"),
            "cfg_scale": float(pairs["CFG scale"]),
            "seed": int(pairs["Seed"]),
            "width": width,
            "height": height,
            "model": pairs.get("Model"),
            "xattn": json.loads(pairs["xattn"]) if "xattn" in pairs else {},
            "pairs": pairs,
        }
    except (KeyError, ValueError) as error:
        raise PngMetadataError(f"the parameters line is missing or has a bad value ({error}): {lines[-1]!r}") from None
    if not isinstance(result["xattn"], dict):
        raise PngMetadataError(f"the parameters' xattn value must be a JSON object, not {pairs['xattn']!r}")
    return result


def png_info(text: str) -> PngInfo:
    """A PngInfo holding ``text`` as the ``parameters`` chunk, for ``image.save(..., pnginfo=)``."""
    info = PngInfo()
    info.add_text(CHUNK, text)
    return info


def read_parameters(png: str | os.PathLike | Image.Image) -> dict[str, Any]:
    """Read and parse the ``parameters`` chunk of a PNG (path or opened image).

    Args:
        png: a PNG file path or a PIL image opened from one.

    Raises:
        PngMetadataError: the file has no ``parameters`` chunk or it cannot be parsed.
    """
    if isinstance(png, Image.Image):
        text = png.info.get(CHUNK)
        name = getattr(png, "filename", "image")
    else:
        if not os.path.isfile(png):
            raise PngMetadataError(f"PNG file {png} does not exist")
        try:
            with Image.open(png) as image:
                if image.format != "PNG":
                    raise PngMetadataError(f"{png} is a {image.format} image, not a PNG")
                image.load()  # text chunks after the image data are read here; a truncated file fails here
                text = image.info.get(CHUNK)
        except (OSError, SyntaxError, ValueError) as error:  # PIL: not an image, truncated, bad chunk
            if isinstance(error, PngMetadataError):
                raise
            raise PngMetadataError(f"{png} cannot be read as a PNG ({error})") from None
        name = str(png)
    if not text:
        raise PngMetadataError(f"{name} has no '{CHUNK}' text chunk; it was not written by xattn or an A1111-style tool")
    return parse_parameters(text)


__all__ = ["CHUNK", "PngMetadataError", "format_parameters", "image_parameters", "parse_parameters", "png_info", "read_parameters"]

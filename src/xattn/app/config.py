"""YAML config files: presets of generation settings, validated on load.

A config is a flat YAML mapping of the same names as the command-line options
(``steps: 25``, ``size: 512x768``, ``scheduler: euler-a``...). Values on the
command line win over the file. Every key is checked when the file is read,
and an error names the file, the key and what would be right, so a typo
(``stpes``) fails at once instead of silently using a default.

Keys every command understands are in :data:`COMMON_KEYS`; a command adds its
own (e.g. ``words`` for ``maps``) through ``extra_keys``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from ..errors import XattnError
from .. import validate as numbers
from ..selector import Selector, SelectorError
from ..validate import OptionError
from .runner import DEVICES, DTYPES, SCHEDULERS

Validator = Callable[[Any], Any]


class ConfigError(XattnError, ValueError):
    """A config file that cannot be read, or a key in it that is unknown or has a bad value."""


# -- value checks: each returns the cleaned value or raises ValueError(what is expected) ----

def optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("a string")
    return str(value)


def one_of(choices: Iterable[str]) -> Validator:
    choices = tuple(choices)

    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return value

    return check


def size_value(value: Any) -> str:
    width, height = numbers.parse_size(value, max_pixels=None)  # the pixel limit is checked with --max-pixels
    return f"{width}x{height}"


def selector_text(value: Any) -> str:
    if not isinstance(value, (str, dict)):
        raise ValueError('a selector string such as "kind=cross res=16"')
    try:
        return str(Selector.coerce(value))
    except SelectorError as error:
        raise ValueError(f"a valid selector ({error})") from None


def syntax_value(value: Any) -> str:
    """A prompt dialect (``syntax: compel``): a sweep's, or a config of a command with ``--syntax``."""
    try:
        return numbers.prompt_syntax(value)
    except OptionError:
        raise ValueError(f"one of {', '.join(numbers.PROMPT_SYNTAXES)}") from None


COMMON_CHECKS: dict[str, Validator] = {
    "model": optional_text,
    "device": one_of(DEVICES),
    "dtype": one_of(("auto", *DTYPES)),
    "scheduler": one_of(SCHEDULERS),
    "seed": numbers.seed,
    "steps": numbers.steps,
    "guidance": numbers.guidance,
    "size": size_value,
    "threads": numbers.threads,
    "max_pixels": lambda value: numbers.integer(value, "max_pixels", low=64),
    "negative_prompt": optional_text,
    "sites": selector_text,  # which sites to aggregate maps over
    "out": optional_text,
}
COMMON_KEYS: tuple[str, ...] = tuple(COMMON_CHECKS)


def validate(data: Mapping[str, Any], *, source: str = "config",
             extra_keys: Mapping[str, Validator | None] | None = None) -> dict[str, Any]:
    """Check every key of ``data``; return the cleaned mapping.

    Args:
        data: the parsed YAML mapping.
        source: where it came from, for error messages (the file name).
        extra_keys: command-specific keys and their checks (``None``: accept any value).

    Raises:
        ConfigError: naming the first unknown key or bad value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of key: value, not {type(data).__name__}")
    checks: dict[str, Validator | None] = {**COMMON_CHECKS, **dict(extra_keys or {})}
    cleaned: dict[str, Any] = {}
    for key, value in data.items():
        if key not in checks:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys are: {', '.join(sorted(checks))}")
        check = checks[key]
        if check is None:
            cleaned[key] = value
            continue
        try:
            cleaned[key] = check(value)
        except OptionError as error:
            raise ConfigError(f"{source}: key {key!r}: {error}") from None
        except ValueError as error:
            raise ConfigError(f"{source}: key {key!r} must be {error}, not {value!r}") from None
    return cleaned


def load_config(path: str | os.PathLike, *, extra_keys: Mapping[str, Validator | None] | None = None) -> dict[str, Any]:
    """Read and validate a YAML config file.

    Args:
        path: the ``.yaml`` file.
        extra_keys: keys the calling command adds to :data:`COMMON_KEYS`, with their checks.

    Raises:
        ConfigError: the file is missing, is not YAML, or has an unknown key or bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    return validate(data or {}, source=str(path), extra_keys=extra_keys)

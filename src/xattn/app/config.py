"""YAML config files: presets of generation settings, validated on load.

A config is a flat YAML mapping of the same names as the command-line options
(``steps: 25``, ``size: 512x768``, ``scheduler: euler-a``...). Values on the
command line win over the file. Every key is checked when the file is read,
and an error names the file, the key and what would be right, so a typo
(``stpes``) fails at once instead of silently using a default.

Keys every command understands are in :data:`COMMON_KEYS`; a command adds its
own (e.g. ``words`` for ``maps``) through ``extra_keys``.

``guide:`` is a mapping, attention guidance as ``xattn generate``'s options
give it (``excite``, ``bind``, ``box``, ``focus``, ``steps``, ``step_size``); it is checked
by building its :class:`~xattn.guide.Guide`, and kept as that Guide's record
(``Guide.to_dict()``), which :func:`guide_from_config` turns back into the Guide.
"""

from __future__ import annotations

import json
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


# -- guide: attention guidance, the mapping form of generate's --excite/--bind/--box/--guide-steps/--guide-step-size

GUIDE_KEYS = ("excite", "bind", "box", "focus", "steps", "step_size", "refine")
# Top-level keys a user may mean as guidance: they belong under ``guide:``.
_GUIDE_OPTIONS = {"excite": "excite", "bind": "bind", "box": "box", "focus": "focus", "focus_radius": "focus",
                  "guide_steps": "steps", "guide_step_size": "step_size", "guide_refine": "refine"}


class _GuideKeyError(ValueError):
    """A bad ``guide.<key>``: ``text`` follows the key's name in the message."""

    def __init__(self, key: str, text: str, *, unknown: bool = False):
        super().__init__(text)
        self.key, self.text, self.unknown = key, text, unknown


def _must_be(key: str, expected: str, value: Any) -> _GuideKeyError:
    return _GuideKeyError(key, f" must be {expected}, not {value!r}")


def _word_list(value: Any) -> bool:
    """Whether a config value is a non-empty list of non-blank words."""
    return isinstance(value, list) and bool(value) and all(isinstance(word, str) and word.strip() for word in value)


def _words_value(value: Any) -> Any:
    """``excite``: a list of words, or the command line's comma string."""
    from ..guide import Excite
    from ..guide.spec import parse_excite

    if isinstance(value, str):
        return parse_excite(value)
    if _word_list(value):
        return Excite(value)
    raise _must_be("excite", 'a list of words such as [circle, square], or "circle,square"', value)


def _bind_value(value: Any) -> Any:
    """``bind``: a mapping of modifier -> noun, or the command line's ``red=circle,blue=square``."""
    from ..guide import Bind
    from ..guide.spec import parse_bind

    if isinstance(value, str):
        return parse_bind(value)
    if isinstance(value, Mapping) and value and all(
            isinstance(word, str) and word.strip() for pair in value.items() for word in pair):
        return Bind(dict(value))
    raise _must_be("bind", 'a mapping of modifier: noun such as {red: circle, blue: square}, '
                           'or "red=circle,blue=square"', value)


def _box_value(value: Any) -> Any:
    """``box``: a mapping of phrase -> [x0, y0, x1, y1], or the command line's ``phrase=x0,y0,x1,y1`` (or a list of them)."""
    from ..guide import Layout
    from ..guide.spec import parse_box

    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return Layout(dict(parse_box(item) for item in value))
    if isinstance(value, Mapping) and value and all(isinstance(phrase, str) and phrase.strip() for phrase in value):
        if all(isinstance(box, list) and len(box) == 4 for box in value.values()):
            return Layout(dict(value))
    raise _must_be("box", "a mapping of phrase: [x0, y0, x1, y1] (fractions of the image) such as "
                          "{red circle: [0, 0, 0.5, 1]}", value)


def _focus_value(value: Any) -> Any:
    """``focus``: a list of words or the command line's comma string, or ``{words: [...], radius: r}``."""
    from ..guide import Focus
    from ..guide.spec import parse_focus

    if isinstance(value, Mapping) and set(value) <= {"words", "radius"} and "words" in value:
        radius = value.get("radius")
        if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, float))):
            raise _must_be("focus", "a radius that is a number (a fraction of the image's side)", radius)
        words = value["words"]
        if isinstance(words, str):
            return parse_focus(words, radius)
        if _word_list(words):
            return Focus(words) if radius is None else Focus(words, radius=radius)
    elif isinstance(value, str):
        return parse_focus(value)
    elif _word_list(value):
        return Focus(value)
    raise _must_be("focus", 'a list of words such as [red, circle], "red,circle", or '
                            "{words: [red, circle], radius: 0.35}", value)


def _window_text(value: Any) -> str:
    """``steps``: read as ``--guide-steps`` reads its text (``0.5``: the first half; ``"0:10"``: steps 0-9)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return str(value)
    raise _must_be("steps", 'a step window such as 0.5 (the first half) or "0:10" (quoted: YAML reads '
                            "2:10 as the number 130)", value)


def _refine_value(value: Any) -> dict:
    """``refine``: a mapping of step: target loss, or the command line's ``"0:0.95,10:0.5"``."""
    from ..guide.spec import parse_refine

    if isinstance(value, str):
        return parse_refine(value)
    if isinstance(value, Mapping) and value and all(isinstance(step, int) and not isinstance(step, bool)
                                                    for step in value):
        return dict(value)
    raise _must_be("refine", 'a mapping of step: target loss such as {0: 0.95, 10: 0.5}, or "0:0.95,10:0.5"', value)


def guide_value(value: Any) -> dict | None:
    """A config's ``guide:`` mapping, checked with the command line's rules: the record of its Guide.

    Raises:
        _GuideKeyError: naming the ``guide.<key>`` at fault (``validate`` turns it into a ConfigError).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"a mapping with keys {', '.join(GUIDE_KEYS)} (docs/guidance.md)")
    for key in value:
        if key not in GUIDE_KEYS:
            raise _GuideKeyError(str(key), f"; guide keys are {', '.join(GUIDE_KEYS)}", unknown=True)
    from ..guide import Guide
    from ..steps import StepWindowError

    losses = []
    for key, read in (("excite", _words_value), ("bind", _bind_value), ("box", _box_value),
                      ("focus", _focus_value)):  # the CLI's order
        if value.get(key) is None:
            continue
        try:
            losses.append(read(value[key]))
        except (XattnError, ValueError) as error:
            if isinstance(error, _GuideKeyError):
                raise
            raise _GuideKeyError(key, f": {error}") from None
    if not losses:
        for key in ("steps", "step_size", "refine"):
            if value.get(key) is not None:
                raise _GuideKeyError(key, " needs a loss: guide.excite, guide.bind, guide.box or guide.focus")
        return None
    options: dict[str, Any] = {}
    for key, name in (("steps", "steps"), ("step_size", "step_size"), ("refine", "refine")):
        if value.get(key) is None:
            continue
        try:
            given = {"steps": _window_text, "refine": _refine_value}.get(key, lambda v: v)(value[key])
            Guide(*losses, **{name: given})  # each option checked alone, so the error names its key
        except _GuideKeyError:
            raise
        except (XattnError, ValueError, StepWindowError) as error:
            raise _GuideKeyError(key, f": {error}") from None
        options[name] = given
    guide = Guide(*losses, **{"steps": 0.5, **options})  # guide_from_text's default window
    return json.loads(json.dumps(guide.to_dict()))  # the manifest's and PNG's form, JSON-equal on resume


def guide_from_config(record: Mapping[str, Any] | None):
    """The :class:`~xattn.guide.Guide` of a checked ``guide:`` value (:func:`guide_value`), or None."""
    if not record:
        return None
    from ..guide import Guide

    return Guide.from_dict(record)


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
    "guide": guide_value,  # attention guidance: generate and generate sweeps use it, other commands drop it
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
            hint = (f" (guidance goes under guide:, as guide: {{{_GUIDE_OPTIONS[key]}: ...}})"
                    if key in _GUIDE_OPTIONS and "guide" in checks else "")
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; known keys are: {', '.join(sorted(checks))}")
        check = checks[key]
        if check is None:
            cleaned[key] = value
            continue
        try:
            cleaned[key] = check(value)
        except _GuideKeyError as error:
            unknown = "unknown " if error.unknown else ""
            raise ConfigError(f"{source}: {unknown}key '{key}.{error.key}'{error.text}") from None
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

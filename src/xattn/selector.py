"""Selectors: which sites, resolutions, steps, heads and tokens a controller touches.

One type, one string syntax, shared by the Python API, the CLI and config files::

    kind=cross res=16 steps=0:0.8 sites=up_blocks.* heads=0:4 tokens=cat,"red circle"

Items are ``key=value`` separated by spaces or ``;``; values are comma lists.

``sites``   globs over site names (``fnmatch``): ``up_blocks.*.attn2``; a glob
            after ``!`` leaves sites out: ``!controlnet.*`` (the UNet only)
``kind``    ``cross``, ``self``, ``joint`` or ``all``; ``cross`` also takes joint
            sites (SD3, Flux), whose points show their image->text block
``res``     a site's size, i.e. the larger side of its (h, w) map: ``16``,
            ``<=32``, ``>=8``, or an exact ``16x24`` (h x w)
``steps``   a step window (:mod:`xattn.steps`): ``3``, ``2:10``, ``5:``, ``0:0.8``,
            ``0.8`` (short for ``0:0.8``); step ``i`` of ``N`` sits at ``i / N``
``heads``   head indices and half-open ranges: ``0,3``, ``0:4``
``tokens``  words or phrases of the prompt, or token indices: ``cat,5``

An absent key selects everything. ``sites``, ``kind``, ``res`` and ``steps``
say *where and when* a controller runs, and mean the same to every
controller. ``heads`` and ``tokens`` say what a controller *slices out of a
map*; only controllers that list them in ``Controller.slices`` accept them
(:class:`xattn.Capture` does), and the session refuses them elsewhere rather
than ignore them. Words are resolved to token indices later, by
:class:`xattn.TokenMap`, once per prompt.
"""

from __future__ import annotations

import fnmatch
import shlex
from dataclasses import dataclass, replace
from typing import Any, Iterable

from .errors import XattnError
from .sites import Site
from .steps import Span, StepWindowError, contains, parse_span

_KEYS = ("sites", "kind", "res", "steps", "heads", "tokens")
WHERE_KEYS = ("sites", "kind", "res", "steps")  # where and when a hook runs: every controller honours them
SLICE_KEYS = ("heads", "tokens")  # what a controller takes out of a map: only some controllers honour them
_KINDS = ("cross", "self", "joint", "all")
_SITE_KINDS = {"cross": ("cross", "joint"), "self": ("self",), "joint": ("joint",)}  # selector kind -> site kinds


class SelectorError(XattnError, ValueError):
    """A selector string, dict or value that cannot be understood."""


@dataclass(frozen=True)
class ResSpec:
    """A condition on a site's map size: ``16``, ``<=32``, ``>=8`` or ``16x24``."""

    op: str  # "==", "<=", ">=", "hw"
    size: int = 0
    hw: tuple[int, int] | None = None

    def matches(self, hw: tuple[int, int]) -> bool:
        if self.op == "hw":
            return tuple(hw) == self.hw
        side = max(hw)
        return {"==": side == self.size, "<=": side <= self.size, ">=": side >= self.size}[self.op]

    def __str__(self) -> str:
        if self.op == "hw":
            return f"{self.hw[0]}x{self.hw[1]}"
        return str(self.size) if self.op == "==" else f"{self.op}{self.size}"


@dataclass(frozen=True)
class Selector:
    """Which attention calls something applies to. Every field ``None`` = all."""

    sites: tuple[str, ...] | None = None
    kind: str | None = None  # "cross", "self", "joint", "all"; None = not set (all)
    res: tuple[ResSpec, ...] | None = None
    steps: tuple[Span, ...] | None = None
    heads: tuple[Span, ...] | None = None
    tokens: tuple[str | int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in _KINDS:
            raise SelectorError(f"kind must be one of {', '.join(_KINDS)}, not {self.kind!r}")
        if self.steps is not None and not all(isinstance(s, Span) for s in self.steps):
            raise SelectorError("steps must be Span objects; use Selector.parse for strings")

    # -- construction -----------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Selector":
        """Parse the string syntax described in the module docstring."""
        lexer = shlex.shlex(text, posix=True)
        lexer.whitespace = " \t\n;"
        lexer.whitespace_split = True
        lexer.commenters = ""
        try:
            items = list(lexer)
        except ValueError as error:  # unclosed quote
            raise SelectorError(f"cannot read selector {text!r}: {error}") from None
        fields: dict[str, str] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise SelectorError(f"selector item {item!r} is not key=value (keys: {', '.join(_KEYS)})")
            key = key.strip()
            if key not in _KEYS:
                raise SelectorError(f"unknown selector key {key!r} in {text!r}; known keys: {', '.join(_KEYS)}")
            if key in fields:
                raise SelectorError(f"selector key {key!r} is given twice in {text!r}")
            if not value:
                raise SelectorError(f"selector key {key!r} has an empty value in {text!r}")
            fields[key] = value
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Selector":
        """Build from a config mapping; values may be strings or lists."""
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise SelectorError(f"unknown selector key(s) {sorted(unknown)}; known keys: {', '.join(_KEYS)}")
        values = {key: _as_items(value, key) for key, value in data.items() if value is not None}
        kind = None
        if "kind" in values:
            if len(values["kind"]) != 1:
                raise SelectorError(f"selector key 'kind' takes one value, got {values['kind']}")
            kind = values["kind"][0]
        return cls(
            sites=tuple(values["sites"]) if "sites" in values else None,
            kind=kind,
            res=tuple(_parse_res(v) for v in values["res"]) if "res" in values else None,
            steps=tuple(_parse_span(v, allow_fraction=True) for v in values["steps"]) if "steps" in values else None,
            heads=tuple(_parse_span(v, allow_fraction=False) for v in values["heads"]) if "heads" in values else None,
            tokens=tuple(_parse_token(v) for v in values["tokens"]) if "tokens" in values else None,
        )

    @classmethod
    def coerce(cls, value: "Selector | str | dict | None", **defaults: Any) -> "Selector":
        """Accept a Selector, a string, a dict or None; fill unset fields from ``defaults``."""
        if value is None:
            selector = cls()
        elif isinstance(value, Selector):
            selector = value
        elif isinstance(value, str):
            selector = cls.parse(value)
        elif isinstance(value, dict):
            selector = cls.from_dict(value)
        else:
            raise SelectorError(f"expected a Selector, a selector string or a dict, not {type(value).__name__}")
        unset = {key: value for key, value in defaults.items() if getattr(selector, key) is None}
        if unset:
            filled = cls.from_dict(unset)
            selector = replace(selector, **{key: getattr(filled, key) for key in unset})
        return selector

    def to_dict(self) -> dict[str, str]:
        """The string form of each set field (round-trips through :meth:`from_dict`)."""
        out: dict[str, str] = {}
        if self.sites is not None:
            out["sites"] = ",".join(self.sites)
        if self.kind is not None:
            out["kind"] = self.kind
        for key in ("res", "steps", "heads"):
            value = getattr(self, key)
            if value is not None:
                out[key] = ",".join(str(v) for v in value)
        if self.tokens is not None:
            out["tokens"] = ",".join(str(t) for t in self.tokens)
        return out

    def __str__(self) -> str:
        return " ".join(f"{key}={shlex.quote(value)}" for key, value in self.to_dict().items())

    # -- matching ----------------------------------------------------------
    def matches_site(self, site: Site) -> bool:
        """Static part of the match: name and kind."""
        if self.kind not in (None, "all") and site.kind not in _SITE_KINDS[self.kind]:
            return False
        if self.sites is not None:
            wanted = [pattern for pattern in self.sites if not pattern.startswith("!")]
            unwanted = [pattern[1:] for pattern in self.sites if pattern.startswith("!")]
            if wanted and not any(fnmatch.fnmatchcase(site.name, pattern) for pattern in wanted):
                return False
            if any(fnmatch.fnmatchcase(site.name, pattern) for pattern in unwanted):
                return False
        return True

    def matches_res(self, hw: tuple[int, int]) -> bool:
        return self.res is None or any(spec.matches(hw) for spec in self.res)

    def matches_step(self, step: int | None, num_steps: int | None) -> bool:
        return contains(self.steps, step, num_steps)

    def head_indices(self, num_heads: int) -> list[int] | None:
        """The selected heads of a site with ``num_heads`` heads (``None`` = all)."""
        if self.heads is None:
            return None
        chosen = [h for h in range(num_heads) if any(span.contains(h) for span in self.heads)]
        return chosen

    def slicing_keys(self) -> tuple[str, ...]:
        """The slicing keys (``heads``, ``tokens``) this selector sets."""
        return tuple(key for key in SLICE_KEYS if getattr(self, key) is not None)

    def select_sites(self, site_list: Iterable[Site]) -> list[Site]:
        return [site for site in site_list if self.matches_site(site)]


# -- value parsers ------------------------------------------------------------

def _as_items(value: Any, key: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = [part for part in str(value).split(",")]
    items = [item.strip() for item in items]
    if any(not item for item in items):
        raise SelectorError(f"selector key {key!r} has an empty item in {value!r}")
    return items


def _parse_span(text: str, *, allow_fraction: bool) -> Span:
    try:
        return parse_span(text, what="steps" if allow_fraction else "heads", allow_fraction=allow_fraction)
    except StepWindowError as error:
        raise SelectorError(str(error)) from None


def _parse_res(text: str) -> ResSpec:
    lowered = text.lower()
    if "x" in lowered:
        h_text, _, w_text = lowered.partition("x")
        if not (h_text.isdigit() and w_text.isdigit()):
            raise SelectorError(f"res: {text!r} is not HxW with integer sides")
        return ResSpec("hw", hw=(int(h_text), int(w_text)))
    for op in ("<=", ">="):
        if lowered.startswith(op):
            size_text = lowered[len(op):]
            break
    else:
        op, size_text = "==", lowered
    if not size_text.isdigit() or int(size_text) == 0:
        raise SelectorError(f"res: {text!r} is not a positive size (examples: 16, <=32, >=8, 16x24)")
    return ResSpec(op, int(size_text))


def _parse_token(text: str) -> str | int:
    return int(text) if text.isdigit() else text


__all__ = ["ResSpec", "SLICE_KEYS", "Selector", "SelectorError", "Span", "WHERE_KEYS"]

"""A model's recommended edit settings: the ``"edit"`` section of its ``xattn_defaults.json``.

Why: which edit settings work depends on the model (the shapes world keeps an
object's mask under a colour swap only with a tight local blend on that
object), so they ship with the model, beside its sampling settings, and
``xattn edit`` uses them wherever no flag or config value says otherwise::

    "edit": {"blend": "edited-object", "object_words": ["circle", "square", "triangle"], "threshold": 0.85,
             "inverted": {"blend_pixels": true}}

``blend`` is a list of words, or ``"edited-object"``: the object word whose
attribute the target changes (``circle`` in ``a red circle`` -> ``a green
circle``, prompt-to-prompt's attribute edit). When the target changes an
object word itself (a shape swap) no blend is chosen: a tight blend would hold
the new shape inside the old one's mask.

``inverted`` holds settings that replace the others when the edited image is a
real one, inverted with :func:`xattn.invert` (``xattn edit --image``): its
measures differ (the background is compared with the input itself).
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

from .errors import EditError

EDITED_OBJECT = "edited-object"
INVERTED = "inverted"
# Keys of the "edit" section: OPTIONS are option names of xattn.edit.edit / xattn edit (``inverted`` may hold
# them too); object_words names the objects ``blend: "edited-object"`` looks for.
OPTIONS = ("mode", "cross_steps", "self_steps", "self_res", "blend", "threshold", "blend_dilate", "blend_steps",
           "blend_pixels")
KEYS = (*OPTIONS, "object_words", INVERTED)


def _words(prompt: str) -> list[str]:
    return [word.strip(",.;:!?").lower() for word in prompt.split()]


def edited_objects(source: str, target: str, object_words: Sequence[str]) -> list[str] | None:
    """The object words (``"circle"``, ``"circle#2"``) whose attributes ``target`` changes.

    None when the target changes, adds or drops an object word, or changes a
    word that no object word follows (there is no object to bound the edit).
    """
    objects = {word.lower() for word in object_words}
    before, after = _words(source), _words(target)
    found: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if objects & set(before[i1:i2] + after[j1:j2]):
            return None
        position = next((k for k in range(j2, len(after)) if after[k] in objects), None)
        if position is None:
            return None
        word = after[position]
        if after.count(word) > 1:  # "a red circle and a blue circle": name the occurrence
            word = f"{word}#{after[:position + 1].count(word)}"
        if word not in found:
            found.append(word)
    return found or None


def check(section: Any, where: str = "the model's edit defaults") -> dict[str, Any]:
    """The ``"edit"`` section as a dict, refusing unknown keys and a malformed ``blend``."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise EditError(f"{where} must be a JSON object, not {type(section).__name__}")
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise EditError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    inverted = section.get(INVERTED)
    if inverted is not None:
        if not isinstance(inverted, Mapping):
            raise EditError(f"{where}: {INVERTED} is a JSON object of edit settings, not {inverted!r}")
        unknown = sorted(set(inverted) - set(OPTIONS))
        if unknown:
            raise EditError(f"{where}: {INVERTED}: unknown key(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    for part in (section, inverted or {}):
        blend = part.get("blend")
        if blend == EDITED_OBJECT and not section.get("object_words"):
            raise EditError(f"{where}: blend {EDITED_OBJECT!r} needs object_words, the words that name objects")
        if blend is not None and blend != EDITED_OBJECT and (
                not isinstance(blend, list) or not all(isinstance(word, str) for word in blend)):
            raise EditError(f"{where}: blend is a list of words or {EDITED_OBJECT!r}, not {blend!r}")
    return dict(section)


def recommended(section: Any, source: str, targets: Sequence[str], *, inverted: bool = False) -> dict[str, Any]:
    """The model's edit settings for these prompts, as :func:`xattn.edit.edit` arguments.

    Args:
        section: the ``"edit"`` section of the model's defaults (None: no recommendation).
        source: the source prompt.
        targets: the target prompts.
        inverted: the source is a real image inverted with :func:`xattn.invert`: the
            section's ``inverted`` settings replace the others.

    Returns:
        Only the settings the model recommends; ``blend`` is resolved to words,
        and left out when ``"edited-object"`` finds no edited object in some target.
    """
    section = check(section)
    if inverted and section.get(INVERTED):
        section = {**section, **section[INVERTED]}
    out = {key: value for key, value in section.items() if key not in ("blend", "object_words", INVERTED)}
    blend = section.get("blend")
    if blend == EDITED_OBJECT:
        # One blend serves every target row, so it is chosen only when every target is an attribute edit.
        found = [edited_objects(source, target, section["object_words"])
                 for target in ([targets] if isinstance(targets, str) else targets)]
        if found and all(found):
            out["blend"] = list(dict.fromkeys(word for words in found for word in words))
    elif blend:
        out["blend"] = list(blend)
    return out


__all__ = ["EDITED_OBJECT", "INVERTED", "KEYS", "OPTIONS", "check", "edited_objects", "recommended"]

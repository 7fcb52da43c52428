"""A text sequence made of several encoders' parts: SD3's CLIP slots, then T5's.

SD3 concatenates CLIP-L and CLIP-G along features (one 77-slot part, both
tokenizers cut prompts alike) and appends T5's sequence after it, so a word
sits at slots in each part. :class:`PartsTokenMap` answers the questions a
:class:`~xattn.tokens.TokenMap` answers, with every part's slots moved by its
offset; a word the length of one part cut still maps to its slots in the
others.
"""

from __future__ import annotations

from .tokens import START_NAMES, TokenError, TokenMap, Word, normal_key, slot_index


class PartsTokenMap:
    """Token maps of consecutive parts of one text sequence.

    Args:
        parts: ``(offset, TokenMap)`` pairs in sequence order; each map covers
            slots ``offset .. offset + map.max_length - 1``; all of one prompt.
    """

    chunks = None

    def __init__(self, parts: list[tuple[int, TokenMap]]):
        if not parts:
            raise ValueError("PartsTokenMap needs at least one part")
        for (offset, token_map), following in zip(parts, [*parts[1:], None]):
            if following is not None and following[0] < offset + token_map.max_length:
                raise ValueError(f"part at {following[0]} overlaps the part at {offset}")
        self.parts = list(parts)
        first = parts[0][1]
        self.start_slots = first.start_slots if parts[0][0] == 0 else 0
        self.prompt, self.written = first.prompt, first.written
        self.max_length = parts[-1][0] + parts[-1][1].max_length
        self.end_slot = parts[-1][0] + parts[-1][1].end_slot  # the last real token of the sequence
        self.cut_words = [w for _, m in parts for w in m.cut_words]
        self.pieces = [piece for _, m in parts for piece in m.pieces]
        self.words = self._merged_words()
        self._whole_words = tuple(dict.fromkeys(w for _, m in parts for w in m._whole_words))

    def _merged_words(self) -> list[Word]:
        """One Word per word of the prompt, holding its slots in every part."""
        merged: dict[tuple[int, int], list] = {}
        for offset, token_map in self.parts:
            for word in token_map.words:
                entry = merged.setdefault((word.start, word.end), [word.text, []])
                entry[1] += [offset + slot for slot in word.slots]
        words, counts = [], {}
        for (start, end), (text, slots) in sorted(merged.items()):
            key = normal_key(text)
            counts[key] = counts.get(key, 0) + 1
            words.append(Word(text, start, end, tuple(slots), counts[key]))
        return words

    @property
    def length(self) -> int:
        return self.end_slot + 1

    def indices(self, key: str | int) -> list[int]:
        """Slots of a word, ``word#n``, phrase, special name or index in every part that holds it."""
        if isinstance(key, int):
            return slot_index(key, self.max_length)
        name = normal_key(key.strip())
        found, errors = [], []
        for offset, token_map in self.parts:
            if name in START_NAMES and not token_map.start_slots:
                continue
            try:
                found += [offset + slot for slot in token_map.indices(key)]
            except TokenError as error:
                errors.append(error)
        if not found:  # an occurrence (``word#2``) counts within each part: the parts cut words alike
            raise errors[0] if errors else TokenError(f"{key!r}: no part of the text has it")
        return found

    def span_indices(self, start: int, end: int) -> list[int]:
        found = []
        for offset, token_map in self.parts:
            try:
                found += [offset + slot for slot in token_map.span_indices(start, end)]
            except TokenError:
                continue
        if not found:
            return self.parts[0][1].span_indices(start, end)  # raises its own message
        return found

    def word_at(self, slot: int) -> str:
        for offset, token_map in reversed(self.parts):
            if slot >= offset:
                return token_map.word_at(slot - offset)
        return "<pad>"

    def to_dict(self) -> dict:
        return {"parts": [{"offset": offset, **token_map.to_dict()} for offset, token_map in self.parts]}

    def __repr__(self) -> str:
        return "PartsTokenMap(" + ", ".join(f"{offset}: {token_map!r}" for offset, token_map in self.parts) + ")"


__all__ = ["PartsTokenMap"]

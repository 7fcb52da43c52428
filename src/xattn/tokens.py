"""Token alignment: which slots of the text sequence hold which words of a prompt.

CLIP pads every prompt to 77 slots: slot 0 is the start token, then the BPE
pieces of the words (a word may take several), then the end token, then
padding. A word's attention map lives at its slots, so every lookup from a
word to an index goes through :class:`TokenMap`, once per prompt, outside the
per-layer code.

Words are the pieces CLIP's pre-tokenizer cuts the text into: runs of
letters, single digits, runs of punctuation, and the contractions ('s, 't, ...).
Matching ignores case and Unicode composition, as CLIP does (its tokenizer
applies NFC and lower-cases): a letter keeps the combining accents that follow
it (``cafe`` + U+0301 is the word ``café``), and a special token written in
the prompt (``<|endoftext|>``) is one word of one slot, as the tokenizer
treats it.

Sentencepiece tokenizers (T5, Gemma) mark a word's first piece with ``▁`` and
put no start token before the prompt (T5) or one (Gemma); the end token
``</s>`` follows the pieces, padding after it. Their pieces are read from the
tokenizer's own offsets (:meth:`TokenMap._lay_out_pieces`), with the same words.
"""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass

import regex

from .errors import XattnError

# CLIP's pre-tokenization rule: contractions, letter runs, single digits, other symbol runs; a letter run
# keeps its combining marks (\p{M}), which NFC folds into the letters before CLIP splits.
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}\p{M}]+|\p{N}|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

# Names that address the special slots.
START_NAMES = ("<start>", "<bos>", "<|startoftext|>")
END_NAMES = ("<end>", "<eos>", "<|endoftext|>")
PAD_NAMES = ("<pad>", "<padding>")


class TokenError(XattnError, KeyError):
    """A word, phrase or index that is not in the prompt."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


@dataclass(frozen=True)
class Word:
    """One word of the prompt and the slots its BPE pieces occupy."""

    text: str  # as written in the prompt
    start: int  # character span in the prompt
    end: int
    slots: tuple[int, ...]  # indices into the padded token sequence (CLIP's start token is slot 0)
    occurrence: int  # 1 for the first time this (lower-cased) word appears, 2 for the next...

    @property
    def key(self) -> str:
        return normal_key(self.text)


def normal_key(text: str) -> str:
    """How CLIP's tokenizer sees a word: NFC-composed and lower-cased."""
    return unicodedata.normalize("NFC", text).lower()


def slot_index(index: int, max_length: int) -> list[int]:
    """An integer key as a slot list: ``[index]`` if a text of ``max_length`` slots holds it."""
    if not 0 <= index < max_length:
        raise TokenError(f"token index {index} is outside 0..{max_length - 1}")
    return [index]


def split_words(text: str, specials: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """The prompt's words with their character spans; each of ``specials`` (``<|endoftext|>``) is one word."""
    if not specials:
        return [(m.group(0), m.start(), m.end()) for m in _WORD_PATTERN.finditer(text)]
    cut = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
    words, position = [], 0
    for match in cut.finditer(text):
        words += [(w, s + position, e + position) for w, s, e in split_words(text[position:match.start()])]
        words.append((match.group(0), match.start(), match.end()))
        position = match.end()
    return words + [(w, s + position, e + position) for w, s, e in split_words(text[position:])]


def _special_tokens(tokenizer) -> tuple[str, ...]:
    """The tokens the tokenizer keeps whole when they are written in a prompt: special and added ones.

    Added tokens include textual-inversion tokens (``<cat-toy>``) loaded by
    diffusers' ``load_textual_inversion``.
    """
    added = list(getattr(tokenizer, "get_added_vocab", dict)() or {})
    names = [*(getattr(tokenizer, "all_special_tokens", None) or ()), *added]
    return tuple(name for name in dict.fromkeys(names) if name and tokenizer.tokenize(name) == [name])


def with_extra_vectors(pieces: list[str], tokenizer) -> list[str]:
    """Pieces as a pipeline feeds them: a multi-vector textual-inversion token ``<t>`` becomes ``<t> <t>_1 ...``.

    This is what diffusers' ``maybe_convert_prompt`` does to the prompt before
    tokenizing, so a word after such a token keeps its true slot.
    """
    added = getattr(tokenizer, "get_added_vocab", dict)() or {}
    if not added:
        return pieces
    out = []
    for piece in pieces:
        out.append(piece)
        if piece in added:
            extra = 1
            while f"{piece}_{extra}" in added:
                out.append(f"{piece}_{extra}")
                extra += 1
    return out


class TokenizerMismatchError(XattnError, ValueError):
    """A tokenizer that does not cut a prompt word by word the way TokenMap reads it."""


class TokenMap:
    """Maps the words and phrases of one prompt to slots of the token sequence.

    Args:
        tokenizer: a Hugging Face tokenizer (CLIP's for Stable Diffusion).
        prompt: the prompt text exactly as given to the pipeline.
        max_length: sequence length; defaults to ``tokenizer.model_max_length`` (77).

    Lookup keys for :meth:`indices`: a word (``"cat"``: every occurrence), the
    n-th occurrence (``"cat#2"``), a phrase (``"red circle"``), a slot index
    (``5``), or a special name: ``<start>``, ``<end>``, ``<pad>``.
    """

    _whole_words: tuple[str, ...] = ()  # tokens kept whole (special, textual inversion) when looking words up
    start_slots = 1  # slots before the first piece: CLIP's start token; 0 for T5

    def __new__(cls, tokenizer=None, *args, **kwargs):
        # A tokenizer may name the map class its prompts need (xattn.prompts.ScheduleTokenizer: prompts with
        # A1111's prompt editing, whose words are looked up in every text of the schedule).
        special = getattr(tokenizer, "token_map_class", None) if cls is TokenMap else None
        return super().__new__(special if isinstance(special, type) and issubclass(special, TokenMap) else cls)

    def __init__(self, tokenizer, prompt: str, max_length: int | None = None):
        self.written = prompt
        self.chunks = None  # a ChunkLayout when the prompt is laid out in 77-slot chunks
        self.cut_from: int | None = None  # character where the first word that was cut starts
        if getattr(tokenizer, "prompt_syntax", None) is not None:  # xattn.prompts.LongPromptTokenizer
            self._lay_out_chunks(tokenizer, prompt)
            return
        if is_sentencepiece(tokenizer):
            self._lay_out_pieces(tokenizer, prompt, max_length)
            return
        self.prompt = prompt
        self.max_length = int(max_length or tokenizer.model_max_length)
        body = self.max_length - 2  # room between the start and end tokens
        self.words: list[Word] = []
        self.cut_words: list[str] = []
        pieces: list[str] = []
        counts: dict[str, int] = {}
        self._whole_words = _special_tokens(tokenizer)
        for text, start, end in split_words(prompt, self._whole_words):
            word_pieces = with_extra_vectors(tokenizer.tokenize(text), tokenizer)
            first_slot = 1 + len(pieces)
            slots = tuple(s for s in range(first_slot, first_slot + len(word_pieces)) if s <= body)
            pieces.extend(word_pieces)
            if len(slots) < len(word_pieces):
                self.cut_words.append(text)
                self.cut_from = start if self.cut_from is None else self.cut_from
            if not slots:
                continue
            key = normal_key(text)
            counts[key] = counts.get(key, 0) + 1
            self.words.append(Word(text, start, end, slots, counts[key]))
        self._check_against_tokenizer(tokenizer, pieces)
        if self.cut_words:
            warnings.warn(
                f"prompt is longer than {body} tokens; these words were cut: {' '.join(self.cut_words)}",
                stacklevel=2,
            )
        self.pieces = pieces[:body]
        self.end_slot = 1 + len(self.pieces)  # the end-of-text token

    def _lay_out_pieces(self, tokenizer, prompt: str, max_length: int | None) -> None:
        """A sentencepiece prompt (T5, Gemma): the tokenizer's own pieces, given to words by character offsets.

        Sentencepiece cuts whole stretches between spaces (``cat,`` may be one
        stretch of pieces), so pieces cannot be made word by word as for CLIP.
        A piece belongs to every word its characters overlap; a bare ``▁``
        (the space before a word) belongs to the word that follows.
        """
        self.prompt = prompt
        self.start_slots = start_slots(tokenizer)
        encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
        limit = getattr(tokenizer, "model_max_length", None)
        if max_length is None:  # a tokenizer without a real limit (1e30): the prompt's own length, no padding
            max_length = limit if limit and limit < 1_000_000 else self.start_slots + len(pieces) + 1
        self.max_length = int(max_length)
        room = self.max_length - 1 - self.start_slots  # pieces that fit before the end token
        self._whole_words = _special_tokens(tokenizer)
        spans = split_words(prompt, self._whole_words)
        owned: list[list[int]] = [[] for _ in spans]
        for index, (start, end) in enumerate(encoding["offset_mapping"]):
            while start < end and prompt[start].isspace():  # the space a leading ▁ stands for
                start += 1
            words = [w for w, (_, s, e) in enumerate(spans) if s < end and start < e] if start < end else []
            if not words:  # a bare ▁: the next word's
                words = [w for w, (_, s, _) in enumerate(spans) if s >= start][:1]
            for word in words:
                owned[word].append(self.start_slots + index)
        self.words, self.cut_words, counts = [], [], {}
        for (text, start, end), slots in zip(spans, owned):
            kept = tuple(slot for slot in slots if slot < self.start_slots + room)
            if len(kept) < len(slots):
                self.cut_words.append(text)
                self.cut_from = start if self.cut_from is None else self.cut_from
            if kept:
                key = normal_key(text)
                counts[key] = counts.get(key, 0) + 1
                self.words.append(Word(text, start, end, kept, counts[key]))
        if self.cut_words:
            warnings.warn(f"prompt is longer than {room} tokens; these words were cut: {' '.join(self.cut_words)}",
                          stacklevel=3)
        self.pieces = pieces[:room]
        self.end_slot = self.start_slots + len(self.pieces)

    def _check_against_tokenizer(self, tokenizer, pieces: list[str], text: str | None = None) -> None:
        text = self.prompt if text is None else text
        whole = with_extra_vectors(tokenizer.tokenize(text), tokenizer)
        if whole != pieces:
            raise TokenizerMismatchError(
                "this tokenizer does not split words the way CLIP does, so TokenMap cannot align "
                f"{text!r}: word by word gives {pieces[:8]}..., the whole prompt {whole[:8]}..."
            )

    def _lay_out_chunks(self, wrapper, written: str) -> None:
        """A written prompt as the long-prompt encoder lays it out: chunk k holds slots 77k .. 77k+76.

        Fragments are tokenized one by one (A1111 reads ``a (red)dish`` as
        ``red`` + ``dish``); words are located in the clean text, which becomes
        :attr:`prompt`. Words beyond ``wrapper.max_chunks`` chunks are cut.
        """
        from .prompts import parse_prompt
        from .prompts.chunks import CHUNK_SLOTS, place_compel_tokens, place_tokens

        tokenizer = wrapper.tokenizer
        parsed = parse_prompt(written, syntax=wrapper.prompt_syntax)
        specials = _special_tokens(tokenizer)
        stream: list[str | None] = []  # token pieces, None for each BREAK
        placed: list[tuple[str, int, int, int, int]] = []  # word, start, end, first token, token count
        count = 0
        for fragment in parsed.fragments:
            if fragment.is_break:
                stream.append(None)
                continue
            fragment_pieces: list[str] = []
            for text, start, end in split_words(fragment.text, specials):
                word_pieces = tokenizer.tokenize(text)
                placed.append((text, fragment.start + start, fragment.start + end, count, len(word_pieces)))
                fragment_pieces += word_pieces
                count += len(word_pieces)
            self._check_against_tokenizer(tokenizer, fragment_pieces, fragment.text)
            stream += fragment_pieces
        compel = wrapper.prompt_syntax == "compel"  # compel's own splitting; max_chunks=1: its cut per prompt
        layout = place_compel_tokens(stream, wrapper.max_chunks == 1) if compel else \
            place_tokens(stream, (tokenizer.tokenize(",") or [None])[0])
        kept = layout.num_chunks if compel else min(layout.num_chunks, wrapper.max_chunks or layout.num_chunks)
        self.prompt, self.chunks = parsed.text, layout
        self.max_length = kept * CHUNK_SLOTS
        self.words, self.cut_words, counts = [], [], {}
        for text, start, end, first, length in placed:
            slots = tuple(slot for slot in layout.slots[first : first + length] if slot < self.max_length)
            if len(slots) < length:
                self.cut_words.append(text)
                self.cut_from = start if self.cut_from is None else self.cut_from
            if slots:
                key = normal_key(text)
                counts[key] = counts.get(key, 0) + 1
                self.words.append(Word(text, start, end, slots, counts[key]))
        self.pieces = [piece for piece in stream if piece is not None]
        self.end_slot = layout.end_slot(kept - 1)

    # -- lookup --------------------------------------------------------------
    @property
    def length(self) -> int:
        """Slots holding real tokens: start, the words, end."""
        return self.end_slot + 1

    def indices(self, key: str | int) -> list[int]:
        """Slot indices for a word, ``word#n``, phrase, special name or index."""
        if isinstance(key, int):
            return slot_index(key, self.max_length)
        name = normal_key(key.strip())
        if name in START_NAMES:
            if not self.start_slots:
                raise TokenError(f"{key!r}: this tokenizer puts no start token before the prompt")
            return [0]
        if name in END_NAMES:
            return [self.end_slot]
        if name in PAD_NAMES:
            return list(range(self.end_slot + 1, self.max_length))
        word_text, _, occurrence_text = name.rpartition("#") if "#" in name else (name, "", "")
        occurrence = None
        if occurrence_text:
            if not occurrence_text.isdigit() or int(occurrence_text) < 1:
                raise TokenError(f"{key!r}: the part after '#' must be an occurrence number >= 1")
            occurrence = int(occurrence_text)
        target = [normal_key(w) for w, _, _ in split_words(word_text, self._whole_words)]
        if not target:
            raise TokenError(f"{key!r} holds no word; words of the prompt: {self._word_list()}")
        matches = self._find(target)
        if not matches:
            raise TokenError(self._missing_message(key, word_text))
        if occurrence is not None:
            if occurrence > len(matches):
                raise TokenError(f"{key!r}: {word_text!r} occurs {len(matches)} time(s) in {self.prompt!r}")
            matches = [matches[occurrence - 1]]
        return [slot for match in matches for word in match for slot in word.slots]

    def span_indices(self, start: int, end: int) -> list[int]:
        """Slots of the words overlapping characters ``[start, end)`` of the prompt.

        This is how a weighted span of a parsed prompt (``xattn.prompt_syntax``)
        finds its tokens without going through words that may repeat.
        """
        slots = [slot for word in self.words if word.start < end and start < word.end for slot in word.slots]
        if not slots and self.cut_from is not None and end > self.cut_from:
            raise TokenError(f"characters {start}..{end} ({self.prompt[start:end]!r}) were cut: the prompt holds "
                             f"more than {self._room()} tokens, and everything from character {self.cut_from} "
                             f"({self.prompt[self.cut_from:self.cut_from + 20]!r}...) on is not encoded")
        if not slots:
            raise TokenError(f"characters {start}..{end} of {self.prompt!r} hold no token")
        return slots

    def _room(self) -> str:
        if self.chunks is None:
            return str(self.max_length - 1 - self.start_slots)
        return f"{self.max_length // 77} chunk(s) of 75"

    def _find(self, target: list[str]) -> list[list[Word]]:
        """Every run of consecutive words equal to ``target`` (case-insensitive)."""
        n = len(target)
        return [
            self.words[i : i + n]
            for i in range(len(self.words) - n + 1)
            if [w.key for w in self.words[i : i + n]] == target
        ]

    def _word_list(self) -> str:
        return ", ".join(repr(w.text) for w in self.words) or "(none)"

    def _missing_message(self, key: str, word_text: str) -> str:
        if any(normal_key(word_text) == normal_key(cut) for cut in self.cut_words):
            return (f"{key!r} was cut: the prompt holds more than {self._room()} tokens; the cut starts at "
                    f"character {self.cut_from} ({self.prompt[self.cut_from:self.cut_from + 20]!r}...)"
                    f"{'' if self.chunks else '; for long-prompt embeddings pass tokenizer=LongPromptTokenizer(...)'}")
        return f"{key!r} is not in the prompt {self.prompt!r}; its words are: {self._word_list()}"

    def word_at(self, slot: int) -> str:
        """The name of whatever sits at ``slot``."""
        if slot % 77 == 0 if self.chunks is not None else slot < self.start_slots:
            return "<start>"
        if slot == self.end_slot:
            return "<end>"
        for word in self.words:
            if slot in word.slots:
                return word.text
        return "<pad>"

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "max_length": self.max_length,
            "end_slot": self.end_slot,
            "words": [
                {"text": w.text, "start": w.start, "end": w.end, "slots": list(w.slots), "occurrence": w.occurrence}
                for w in self.words
            ],
            "whole_words": list(self._whole_words),
        }

    def __repr__(self) -> str:
        listed = " ".join(f"{w.text}{list(w.slots)}" for w in self.words)
        start = "<start>[0] " if self.start_slots else ""
        return f"TokenMap({self.prompt!r}: {start}{listed} <end>[{self.end_slot}])"


def is_sentencepiece(tokenizer) -> bool:
    """Whether the tokenizer marks word starts with ``▁`` (sentencepiece: T5, Gemma) instead of CLIP's ``</w>``."""
    try:
        return any(piece.startswith("\u2581") for piece in tokenizer.tokenize("a photo"))
    except (AttributeError, TypeError):
        return False


def start_slots(tokenizer) -> int:
    """How many special tokens the tokenizer puts before a prompt's pieces (CLIP, Gemma: 1; T5: 0)."""
    body = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), 0)

"""Long prompts: A1111's 75-token chunks, with comma backtracking and BREAK.

CLIP reads 77 slots: a start token, 75 tokens, an end token. A1111 (and
compel with truncation off) encode a longer prompt as several such windows
and concatenate the embeddings, so chunk ``k`` holds slots ``77k .. 77k+76``.
A1111's rules, restated:

* tokens fill a chunk up to 75; a ``BREAK`` closes the chunk early;
* when a chunk is full and its last comma is at most 20 tokens back, the
  tokens after that comma move to the next chunk, so a phrase is not cut;
* each chunk is ``<start>``, its tokens, ``<end>``, then padding to 77;
* a prompt with no tokens is one chunk of padding.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_TOKENS = 75  # tokens between the start and end token of one window
CHUNK_SLOTS = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"


@dataclass(frozen=True)
class ChunkLayout:
    """Where each token of a prompt lands: ``slots[i]`` is token ``i``'s slot in the 77·k sequence."""

    slots: tuple[int, ...]
    chunk_lengths: tuple[int, ...]  # tokens in each chunk (without start and end)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_lengths)

    def end_slot(self, chunk: int) -> int:
        return chunk * CHUNK_SLOTS + 1 + self.chunk_lengths[chunk]


def place_tokens(stream: list, comma, backtrack: int = COMMA_BACKTRACK) -> ChunkLayout:
    """Lay ``stream`` (tokens, with ``None`` for each BREAK) out in chunks; ``comma`` is the comma token."""
    chunks: list[list[int]] = [[]]  # per chunk: indices of the real tokens of the stream
    last_comma = -1
    token_index = 0
    for item in stream:
        current = chunks[-1]
        if item is None:
            chunks.append([])
            last_comma = -1
            continue
        if item == comma:
            last_comma = len(current)
        elif backtrack and len(current) == CHUNK_TOKENS and last_comma != -1 \
                and len(current) - last_comma <= backtrack:
            moved = current[last_comma + 1 :]
            del current[last_comma + 1 :]
            chunks.append(moved)
            last_comma = -1
            current = chunks[-1]
        if len(current) == CHUNK_TOKENS:
            chunks.append([])
            last_comma = -1
            current = chunks[-1]
        current.append(token_index)
        token_index += 1
    if not chunks[-1] and len(chunks) > 1:
        chunks.pop()  # a chunk is only closed at the end if it holds something
    slots = [0] * token_index
    for number, members in enumerate(chunks):
        for position, index in enumerate(members):
            slots[index] = number * CHUNK_SLOTS + 1 + position
    return ChunkLayout(tuple(slots), tuple(len(members) for members in chunks))


def chunk_ids(ids: list[int], layout: ChunkLayout, start: int, end: int, pad: int) -> list[list[int]]:
    """The 77 token ids of each chunk: ``<start>``, tokens, ``<end>``, padding."""
    rows = [[start] + [pad] * (CHUNK_SLOTS - 1) for _ in range(layout.num_chunks)]
    for token, slot in zip(ids, layout.slots):
        rows[slot // CHUNK_SLOTS][slot % CHUNK_SLOTS] = token
    for number in range(layout.num_chunks):
        rows[number][1 + layout.chunk_lengths[number]] = end
    return rows


_SENTENCE_END = (".</w>",)
_PHRASE_END = (".</w>", ",</w>", ";</w>", ":</w>")


def place_compel_tokens(pieces: list, truncate: bool = False) -> ChunkLayout:
    """Lay tokens out as compel (``truncate_long_prompts=False``) splits a long prompt.

    ``pieces`` are the tokenizer's pieces (``cat</w>``), with ``None`` where a new
    chunk must start (between the prompts of compel's ``.and()``). compel's rule,
    restated: while more than 75 tokens remain, the chunk ends after the last
    sentence end (``.``) among the next 75; failing that after the last phrase end
    (``. , ; :``); failing that after the last whole word; failing that after 75
    tokens. With ``truncate`` (compel's default) each part is cut after 75 tokens:
    the tokens cut get slots past the last chunk, which a reader drops.
    """
    chunks: list[list[int]] = []
    segments: list[list[int]] = [[]]
    position = 0
    for piece in pieces:
        if piece is None:
            segments.append([])
        else:
            segments[-1].append(position)
            position += 1
    texts = [piece for piece in pieces if piece is not None]
    cut: list[int] = []
    for segment in segments:
        remaining = segment
        while True:
            split = len(remaining) if len(remaining) <= CHUNK_TOKENS else _compel_split(
                [texts[i] for i in remaining[:CHUNK_TOKENS]], truncate)
            chunks.append(remaining[:split])
            remaining = remaining[split:]
            if not remaining or truncate:
                break
        cut += remaining
    slots = [0] * position
    for number, members in enumerate(chunks):
        for offset, index in enumerate(members):
            slots[index] = number * CHUNK_SLOTS + 1 + offset
    for offset, index in enumerate(cut):  # past every chunk: a reader drops them
        slots[index] = len(chunks) * CHUNK_SLOTS + 1 + offset
    return ChunkLayout(tuple(slots), tuple(len(members) for members in chunks))


def _compel_split(window: list[str], truncate: bool) -> int:
    if truncate:
        return CHUNK_TOKENS
    for accept in (lambda t: t in _SENTENCE_END, lambda t: t in _PHRASE_END, lambda t: t.endswith("</w>")):
        for index in range(len(window) - 1, -1, -1):
            if accept(window[index]):
                return index + 1
    return CHUNK_TOKENS

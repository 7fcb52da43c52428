"""Token alignment between a source prompt and a target prompt, as mapper matrices.

prompt-to-prompt (Hertz et al. 2022) edits an image by giving the target
prompt the source prompt's cross-attention maps. The maps live on token
slots, and the two prompts' slots do not line up one to one when a word
changes its number of BPE pieces or words are added. A :class:`Mapper` says,
once per run, how each target slot is made from source slots::

    P_tgt[..., t] <- sum_s P_src[..., s] * matrix[s, t]     where alpha[t] = 1
    P_tgt[..., t] stays the target's own                    where alpha[t] = 0

Two ways to build one:

- :func:`replace_mapper` (word swap): the prompts have the same number of
  words; word ``k`` of the source maps onto word ``k`` of the target. Words of
  equal piece counts map piece to piece; a word of ``n`` pieces replaced by one
  of ``m`` pieces is *stretched* (:func:`stretch`): each source piece hands its
  attention to the target pieces it overlaps when both words are laid on
  ``[0, 1)``, so no attention is created or lost.
- :func:`refine_mapper` (added or changed words): a global alignment of the two
  piece lists (:func:`align_tokens`, a longest common subsequence); matched
  pieces take the source's attention, the rest keep the target's own.

The start token maps to the start token; the end token to the end token; the
padding slots after it are stretched onto the target's padding.

Long prompts (token maps of :class:`xattn.prompts.LongPromptTokenizer`: 77-slot
chunks, CLIP's start and end token in each) are mapped over all their slots:
words map wherever they lie (a word of chunk 2 at slots 77 and up), and each
chunk's start, end and padding map onto the same chunk's. A prompt with fewer
chunks than the batch is padded with empty chunks (start, end, padding), as the
long-prompt encoder pads it; a target may not fill more chunks than the source
(:func:`check_chunks`), since padding the source would change its image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..prompts.chunks import CHUNK_SLOTS
from ..tokens import TokenMap
from .errors import EditError


@dataclass(frozen=True)
class Mapper:
    """How one target prompt's cross-attention is made from the source's.

    Attributes:
        matrix: ``[j_src, j_tgt]`` float64; column ``t`` says how much of each
            source slot's attention target slot ``t`` receives.
        alpha: ``[j_tgt]`` float64, 1 where target slot ``t`` takes the mapped
            source attention, 0 where it keeps its own.
        source, target: the two prompts, for messages and manifests.
    """

    matrix: torch.Tensor
    alpha: torch.Tensor
    source: str
    target: str

    def sources_of(self, slot: int) -> list[int]:
        """Source slots feeding target ``slot`` (empty where the target keeps its own)."""
        if self.alpha[slot] == 0:
            return []
        return torch.nonzero(self.matrix[:, slot]).flatten().tolist()

    def slot_pairs(self, upto: int | None = None) -> dict[int, list[int]]:
        """``{target slot: [source slots]}`` for target slots ``0..upto-1`` (all by default)."""
        count = self.matrix.shape[1] if upto is None else upto
        return {t: self.sources_of(t) for t in range(count)}


def stretch(n_source: int, n_target: int) -> torch.Tensor:
    """``[n_source, n_target]``: lay both runs of slots on ``[0, 1)`` and share by overlap.

    Entry ``[s, t]`` is the fraction of source slot ``s``'s interval that target
    slot ``t``'s interval covers, so every row sums to 1 (attention is moved,
    never created or lost); equal counts give the identity.
    """
    if n_source <= 0 or n_target <= 0:
        raise EditError(f"cannot stretch {n_source} slot(s) onto {n_target}: both runs need at least one slot")
    s = torch.arange(n_source, dtype=torch.float64)[:, None]  # [n_src, 1]
    t = torch.arange(n_target, dtype=torch.float64)[None, :]  # [1, n_tgt]
    low = torch.maximum(s / n_source, t / n_target)
    high = torch.minimum((s + 1) / n_source, (t + 1) / n_target)
    return (high - low).clamp(min=0) * n_source  # [n_src, n_tgt]


def replace_mapper(source: TokenMap, target: TokenMap, length: int | None = None) -> Mapper:
    """Word swap: word ``k`` of ``source`` onto word ``k`` of ``target``.

    Args:
        source: token map of the source prompt.
        target: token map of the target prompt; same number of words.
        length: slots of the batch (long prompts padded with empty chunks to it); the maps' own by default.

    Raises:
        EditError: the prompts have different numbers of words (use
            :func:`refine_mapper` for added words) or sequence lengths.
    """
    length = _common_length(source, target, length)
    if len(source.words) != len(target.words):
        raise EditError(
            f"a word swap (replace) needs the same number of words: {source.prompt!r} has {len(source.words)}, "
            f"{target.prompt!r} has {len(target.words)}; use refine for added or removed words"
        )
    if _chunked(source, target):
        blocks = [([start], [start]) for start, _, _ in _chunk_structure(target, length)]
        blocks += [(list(a.slots), list(b.slots)) for a, b in zip(source.words, target.words)]
        blocks += _chunk_tail_blocks(source, target, length)
        matrix = torch.zeros(length, length, dtype=torch.float64)
        for source_slots, target_slots in blocks:
            _put(matrix, source_slots, target_slots, stretch(len(source_slots), len(target_slots)))
        return Mapper(matrix, torch.ones(length, dtype=torch.float64), source.prompt, target.prompt)
    blocks = [([0], [0])]
    blocks += [(list(a.slots), list(b.slots)) for a, b in zip(source.words, target.words)]
    blocks += _tail_blocks(source, target, length)
    matrix = torch.zeros(length, length, dtype=torch.float64)
    for source_slots, target_slots in blocks:
        matrix[source_slots[0]:source_slots[-1] + 1, target_slots[0]:target_slots[-1] + 1] = stretch(
            len(source_slots), len(target_slots))
    return Mapper(matrix, torch.ones(length, dtype=torch.float64), source.prompt, target.prompt)


def align_tokens(a: Sequence[str], b: Sequence[str]) -> list[tuple[int | None, int | None]]:
    """A global alignment of two token lists: their longest common subsequence.

    Returns pairs ``(i, j)`` for matched tokens, ``(i, None)`` for tokens only
    in ``a`` and ``(None, j)`` for tokens only in ``b``, in order. A changed
    token is a deletion plus an insertion, never a match, so a changed word
    keeps its own attention. Ties go to the earliest match.
    """
    n, m = len(a), len(b)
    # suffix[i][j]: length of the longest common subsequence of a[i:] and b[j:]
    suffix = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if a[i] == b[j]:
                suffix[i][j] = suffix[i + 1][j + 1] + 1
            else:
                suffix[i][j] = max(suffix[i + 1][j], suffix[i][j + 1])
    pairs: list[tuple[int | None, int | None]] = []
    i = j = 0
    while i < n and j < m:
        if a[i] == b[j] and suffix[i][j] == suffix[i + 1][j + 1] + 1:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif suffix[i + 1][j] >= suffix[i][j + 1]:
            pairs.append((i, None))
            i += 1
        else:
            pairs.append((None, j))
            j += 1
    pairs += [(k, None) for k in range(i, n)] + [(None, k) for k in range(j, m)]
    return pairs


def refine_mapper(source: TokenMap, target: TokenMap, length: int | None = None) -> Mapper:
    """Refinement: pieces common to both prompts take the source's attention; new pieces keep their own.

    Args:
        source: token map of the source prompt.
        target: token map of the target prompt (words may be added or changed).
        length: slots of the batch (long prompts padded with empty chunks to it); the maps' own by default.
    """
    length = _common_length(source, target, length)
    matrix = torch.zeros(length, length, dtype=torch.float64)
    alpha = torch.zeros(length, dtype=torch.float64)
    if _chunked(source, target):
        for start, _, _ in _chunk_structure(target, length):
            matrix[start, start] = alpha[start] = 1.0
        source_slots, target_slots = _piece_slots(source), _piece_slots(target)
        for i, j in align_tokens(source.pieces, target.pieces):
            if i is not None and j is not None and i < len(source_slots) and j < len(target_slots):
                matrix[source_slots[i], target_slots[j]] = alpha[target_slots[j]] = 1.0
        for source_run, target_run in _chunk_tail_blocks(source, target, length):
            _put(matrix, source_run, target_run, stretch(len(source_run), len(target_run)))
            alpha[target_run] = 1.0
        return Mapper(matrix, alpha, source.prompt, target.prompt)
    matrix[0, 0] = alpha[0] = 1.0
    for i, j in align_tokens(source.pieces, target.pieces):
        if i is not None and j is not None:
            matrix[1 + i, 1 + j] = alpha[1 + j] = 1.0  # slot 0 is the start token
    for source_slots, target_slots in _tail_blocks(source, target, length):
        matrix[source_slots[0]:source_slots[-1] + 1, target_slots[0]:target_slots[-1] + 1] = stretch(
            len(source_slots), len(target_slots))
        alpha[target_slots] = 1.0
    return Mapper(matrix, alpha, source.prompt, target.prompt)


def choose_mode(source: TokenMap, target: TokenMap) -> str:
    """``"replace"`` when the prompts have as many words, else ``"refine"`` (the CLI's ``auto``)."""
    return "replace" if len(source.words) == len(target.words) else "refine"


def build_mapper(mode: str, source: TokenMap, target: TokenMap, length: int | None = None) -> Mapper:
    """The mapper of ``mode`` (``"replace"``, ``"refine"`` or ``"auto"``) for one target, over ``length`` slots."""
    if mode == "auto":
        mode = choose_mode(source, target)
    if mode == "replace":
        return replace_mapper(source, target, length)
    if mode == "refine":
        return refine_mapper(source, target, length)
    raise EditError(f"edit mode must be replace, refine or auto, not {mode!r}")


def chunk_count(token_map: TokenMap) -> int | None:
    """How many 77-slot chunks a long-prompt token map fills (``None`` for a plain one-window map)."""
    return token_map.max_length // CHUNK_SLOTS if token_map.chunks is not None else None


def check_chunks(token_maps: Sequence[TokenMap]) -> int:
    """The batch's sequence length; refuses a target that fills more 75-token chunks than the source.

    The batch pads every prompt with empty chunks to the longest (as the
    long-prompt encoder pads a batch). A target with fewer chunks than the
    source is padded, and its extra chunks take the source's; the source
    cannot be padded, since an empty chunk changes its image, which must be
    the source prompt's own.

    Raises:
        EditError: a target fills more chunks than the source.
    """
    source, targets = token_maps[0], token_maps[1:]
    if chunk_count(source) is not None:
        for target in targets:
            if chunk_count(target) > chunk_count(source):
                raise EditError(
                    f"the target prompt {target.prompt!r} fills {chunk_count(target)} chunks of 75 tokens and the "
                    f"source {source.prompt!r} {chunk_count(source)}: the chunks cannot be aligned, since padding "
                    "the source with an empty chunk would change the source's image; shorten the target or "
                    "lengthen the source (or BREAK it) so that the target fills no more chunks than the source")
    return max(token_map.max_length for token_map in token_maps)


def _common_length(source: TokenMap, target: TokenMap, length: int | None = None) -> int:
    if _chunked(source, target):
        longest = max(source.max_length, target.max_length)
        if length is None:
            return longest
        if length < longest or length % CHUNK_SLOTS:
            raise EditError(f"a batch of {length} slots cannot hold chunks of {longest} slots")
        return length
    if source.max_length != target.max_length:
        raise EditError(f"the prompts have token sequences of different lengths ({source.max_length} and "
                        f"{target.max_length}); encode both with the same tokenizer")
    if length is not None and length != source.max_length:
        raise EditError(f"the prompts have {source.max_length} slots, not {length}")
    return source.max_length


def _chunked(source: TokenMap, target: TokenMap) -> bool:
    """Both maps are long-prompt maps (77-slot chunks); a mix is refused."""
    kinds = (getattr(source, "chunks", None) is not None, getattr(target, "chunks", None) is not None)
    if kinds[0] != kinds[1]:
        raise EditError("the source and the target were laid out by different tokenizers (one in 77-slot chunks); "
                        "make both token maps with the same tokenizer")
    return kinds[0]


def _chunk_structure(token_map: TokenMap, length: int) -> list[tuple[int, int, list[int]]]:
    """(start slot, end slot, padding slots) of each chunk, the map padded with empty chunks to ``length``."""
    kept = token_map.max_length // CHUNK_SLOTS
    out = []
    for chunk in range(length // CHUNK_SLOTS):
        start = chunk * CHUNK_SLOTS
        end = token_map.chunks.end_slot(chunk) if chunk < kept else start + 1  # an empty chunk: start, end, padding
        out.append((start, end, list(range(end + 1, start + CHUNK_SLOTS))))
    return out


def _chunk_tail_blocks(source: TokenMap, target: TokenMap, length: int) -> list[tuple[list[int], list[int]]]:
    """Chunk by chunk: end onto end, padding stretched onto padding (or the tails together if either has none)."""
    blocks = []
    for (_, source_end, source_pads), (_, target_end, target_pads) in zip(_chunk_structure(source, length),
                                                                          _chunk_structure(target, length)):
        if source_pads and target_pads:
            blocks += [([source_end], [target_end]), (source_pads, target_pads)]
        else:
            blocks.append(([source_end, *source_pads], [target_end, *target_pads]))
    return blocks


def _piece_slots(token_map: TokenMap) -> list[int]:
    """The slot of each piece of a long-prompt map that was kept (pieces past a cut have none)."""
    return [slot for slot in token_map.chunks.slots if slot < token_map.max_length]


def _put(matrix: torch.Tensor, rows: list[int], columns: list[int], block: torch.Tensor) -> None:
    """``matrix[rows x columns] = block`` for slot lists that need not be contiguous (a word cut by a chunk's end)."""
    matrix[torch.tensor(rows)[:, None], torch.tensor(columns)[None, :]] = block


def _tail_blocks(source: TokenMap, target: TokenMap, length: int) -> list[tuple[list[int], list[int]]]:
    """End token onto end token, padding stretched onto padding (or, if either has none, the tails together)."""
    source_pads = list(range(source.end_slot + 1, length))
    target_pads = list(range(target.end_slot + 1, length))
    if source_pads and target_pads:
        return [([source.end_slot], [target.end_slot]), (source_pads, target_pads)]
    return [(list(range(source.end_slot, length)), list(range(target.end_slot, length)))]


__all__ = ["Mapper", "align_tokens", "build_mapper", "check_chunks", "choose_mode", "chunk_count", "refine_mapper", "replace_mapper", "stretch"]

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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


def replace_mapper(source: TokenMap, target: TokenMap) -> Mapper:
    """Word swap: word ``k`` of ``source`` onto word ``k`` of ``target``.

    Args:
        source: token map of the source prompt.
        target: token map of the target prompt; same number of words.

    Raises:
        EditError: the prompts have different numbers of words (use
            :func:`refine_mapper` for added words) or sequence lengths.
    """
    length = _common_length(source, target)
    if len(source.words) != len(target.words):
        raise EditError(
            f"a word swap (replace) needs the same number of words: {source.prompt!r} has {len(source.words)}, "
            f"{target.prompt!r} has {len(target.words)}; use refine for added or removed words"
        )
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


def refine_mapper(source: TokenMap, target: TokenMap) -> Mapper:
    """Refinement: pieces common to both prompts take the source's attention; new pieces keep their own.

    Args:
        source: token map of the source prompt.
        target: token map of the target prompt (words may be added or changed).
    """
    length = _common_length(source, target)
    matrix = torch.zeros(length, length, dtype=torch.float64)
    alpha = torch.zeros(length, dtype=torch.float64)
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


def build_mapper(mode: str, source: TokenMap, target: TokenMap) -> Mapper:
    """The mapper of ``mode`` (``"replace"``, ``"refine"`` or ``"auto"``) for one target."""
    if mode == "auto":
        mode = choose_mode(source, target)
    if mode == "replace":
        return replace_mapper(source, target)
    if mode == "refine":
        return refine_mapper(source, target)
    raise EditError(f"edit mode must be replace, refine or auto, not {mode!r}")


def _common_length(source: TokenMap, target: TokenMap) -> int:
    if source.max_length != target.max_length:
        raise EditError(f"the prompts have token sequences of different lengths ({source.max_length} and "
                        f"{target.max_length}); encode both with the same tokenizer")
    return source.max_length


def _tail_blocks(source: TokenMap, target: TokenMap, length: int) -> list[tuple[list[int], list[int]]]:
    """End token onto end token, padding stretched onto padding (or, if either has none, the tails together)."""
    source_pads = list(range(source.end_slot + 1, length))
    target_pads = list(range(target.end_slot + 1, length))
    if source_pads and target_pads:
        return [([source.end_slot], [target.end_slot]), (source_pads, target_pads)]
    return [(list(range(source.end_slot, length)), list(range(target.end_slot, length)))]


__all__ = ["Mapper", "align_tokens", "build_mapper", "choose_mode", "refine_mapper", "replace_mapper", "stretch"]

"""Which rows of the UNet batch are edited, and from which source row.

An edit batch holds the source prompt (prompt 0) and the targets (prompts
1..n), all started from the same initial latent. Each target row is paired
with the source row of the same image and the same guidance half. Like
prompt-to-prompt (Hertz et al. 2022), only the *conditional* rows are edited
by default: the unconditional rows of classifier-free guidance see the same
empty prompt in every image, so their prediction is left as the sampler made
it and guidance still pushes toward the target prompt. ``rows="all"`` edits
the unconditional rows too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hookpoints import BatchLayout, Row
from ..tokens import TokenMap
from .errors import EditError

ROWS = ("cond", "all")


@dataclass(frozen=True)
class RowPairs:
    """Source and target rows, in matching order: ``target[k]`` is edited from ``source[k]``.

    Attributes:
        source: ``[n]`` long, row of the source prompt for each pair.
        target: ``[n]`` long, the edited row.
        prompt: the target prompt (1..) of each pair.
    """

    source: torch.Tensor
    target: torch.Tensor
    prompt: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt)


def check_rows(rows: str) -> str:
    if rows not in ROWS:
        raise EditError(f"rows must be one of {', '.join(ROWS)}, not {rows!r}")
    return rows


def row_pairs(layout: BatchLayout, rows: str = "cond") -> RowPairs:
    """Pair every target row of ``layout`` with its source row.

    Args:
        layout: the batch layout of the call (``ctx.layout``).
        rows: ``"cond"`` (conditional rows only) or ``"all"``.

    Raises:
        EditError: fewer than two prompts, or a target row without a source row.
    """
    if layout.num_prompts < 2:
        raise EditError(f"an edit needs the source prompt and at least one target prompt in one batch; this call has "
                        f"{layout.num_prompts} prompt(s): pass [source, target, ...] to the pipeline")
    halves = (True,) if rows == "cond" else (True, False)
    source, target, prompt = [], [], []
    for cond in halves:
        for row_index in layout.row_indices(cond=cond):
            row = layout.rows[row_index]
            if row.prompt == 0:
                continue
            matches = layout.row_indices(cond=cond, prompt=0, image=row.image)
            if not matches:
                raise EditError(f"row {row_index} (prompt {row.prompt}, image {row.image}) has no source row "
                                "to copy from")
            source.append(matches[0])
            target.append(row_index)
            prompt.append(row.prompt)
    return RowPairs(torch.tensor(source, dtype=torch.long), torch.tensor(target, dtype=torch.long), tuple(prompt))


def edit_layout(tokenizer, source: str, targets: list[str], *, guidance: bool = True) -> BatchLayout:
    """The layout of an edit batch for a bare UNet call (benchmarks, custom loops).

    Rows are ordered as diffusers' SD pipelines order them: every prompt's
    unconditional row (with guidance), then every prompt's conditional row;
    prompt 0 is the source. Pass it as ``xattn.hooks(unet, ..., layout=...)``.

    Args:
        tokenizer: the pipeline's (first) tokenizer.
        source: the source prompt.
        targets: the target prompts.
        guidance: whether the batch holds classifier-free guidance's unconditional rows.
    """
    prompts = (source, *targets)
    halves = (False, True) if guidance else (True,)
    rows = tuple(Row(cond, prompt, 0) for cond in halves for prompt in range(len(prompts)))
    return BatchLayout(rows=rows, prompts=prompts, token_maps=tuple(TokenMap(tokenizer, p) for p in prompts))


__all__ = ["ROWS", "RowPairs", "check_rows", "edit_layout", "row_pairs"]

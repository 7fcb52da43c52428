"""The fenced code blocks of the README and docs/, for the tests that run them verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(language: str) -> list[tuple[str, int, str]]:
    """``(file relative to the repository, line of the fence, code)`` of every ```language block."""
    fence = re.compile(rf"^```{re.escape(language)}\n(.*?)^```", re.S | re.M)
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in fence.finditer(text):
            line = text[: match.start()].count("\n") + 1
            blocks.append((path.relative_to(ROOT).as_posix(), line, match.group(1)))
    return blocks

"""Every Python example in the README and docs/ runs verbatim, each in a fresh interpreter.

A newcomer copies these first: running them in a subprocess (not inside the
test process, whose imports could hide a missing one) is the only honest check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            blocks.append((path.relative_to(ROOT).as_posix(), line, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_its_python_example():
    assert any(path == "README.md" for path, _, _ in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_python_example_runs_verbatim(path, line, code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{path}:{line} failed:\n{result.stdout}\n{result.stderr}"

"""Every Python block of docs/prompts.md runs verbatim, and prints what its comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "prompts.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs_and_prints_what_its_comments_say(block, tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    promised = [line.split("# ", 1)[1] for line in block.splitlines() if line.startswith("print(") and "# " in line]
    printed = result.stdout.splitlines()
    assert len(printed) == len(promised)
    for said, shown in zip(promised, printed):
        assert said.startswith(shown), f"the page says {said!r}, the code printed {shown!r}"

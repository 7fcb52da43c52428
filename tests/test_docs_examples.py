"""Every Python example in the README and docs/ runs verbatim, each in a fresh interpreter.

A newcomer copies these first: running them in a subprocess (not inside the
test process, whose imports could hide a missing one) is the only honest check.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from doc_blocks import code_blocks

BLOCKS = code_blocks("python")


def test_the_readme_has_its_python_example():
    assert any(path == "README.md" for path, _, _ in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_python_example_runs_verbatim(path, line, code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{path}:{line} failed:\n{result.stdout}\n{result.stderr}"

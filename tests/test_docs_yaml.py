"""The YAML examples of docs/cli.md run verbatim: each block, saved as a file, is given to the command it is for.

A config block (a ``guide:`` mapping) goes to ``xattn generate --config`` with a
prompt holding its words; a sweep block (``job:``) to ``xattn sweep``. Each must
run, and the run must have done what the block says: the guidance it lists,
every job of its grid.
"""

from __future__ import annotations

import json
from itertools import product

import pytest
import yaml

from doc_blocks import code_blocks

# the guide: block's losses, by the names their records carry
_LOSS_OF_KEY = {"excite": "excite", "bind": "bind", "box": "layout", "focus": "focus"}
BLOCKS = code_blocks("yaml")


def test_the_cli_doc_shows_a_guide_config_and_a_sweep():
    kinds = {"sweep" if "job" in yaml.safe_load(code) else "config" for _, _, code in BLOCKS}
    assert kinds == {"config", "sweep"}


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_yaml_example_runs_verbatim(path, line, code, cli, tmp_path):
    data = yaml.safe_load(code)
    (tmp_path / "example.yaml").write_text(code)
    if "job" in data:
        result = cli("sweep", "example.yaml", "--out", "sweep", "--no-progress")
        assert result.exit_code == 0, f"{path}:{line}\n{result.output}"
        grid = data["grid"]
        expected = len(list(product(*grid.values())))
        done = (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()
        assert len(done) == expected and (tmp_path / "sweep" / "contact-sheet.png").exists()
        return
    words = ["a red circle and a blue square"]  # holds every word and phrase of the guide block
    result = cli("generate", *words, "--config", "example.yaml", "--steps", "4", "--out", "guided", "--no-progress")
    assert result.exit_code == 0, f"{path}:{line}\n{result.output}"
    record = json.loads((tmp_path / "guided" / "manifest.json").read_text())["guide"]
    assert [loss["loss"] for loss in record["guide"]] == [_LOSS_OF_KEY[key] for key in data["guide"]
                                                          if key in _LOSS_OF_KEY]
    assert record["step_size"] == data["guide"]["step_size"]

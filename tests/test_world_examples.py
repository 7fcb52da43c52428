"""The README's and docs/cli.md's shapes-world commands run verbatim and draw what they say.

Each ``xattn generate "..."``, ``xattn maps "..."`` and ``xattn edit ...``
line is run as written (in a scratch folder), and its images are read with
the world's segmenter: a generated image must hold every named object in its
named shape, and an edit must recolour the object while keeping its mask.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from xattn.cli import app
from xattn.world.measure import as_rgb, colour_swap, drawn_as_named, object_words

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "cli.md"]
# A command with a quoted world prompt, up to the end of its code span, table cell or line.
COMMAND = re.compile(r'xattn (?:generate|maps|edit) [^`|\n]*"[^`|\n]*')
pytestmark = pytest.mark.slow


def documented_commands() -> list[str]:
    found = {match.group(0).strip() for doc in DOCS for match in COMMAND.finditer(doc.read_text())}
    return sorted(found)


def run(command: str, folder: Path) -> Path:
    """Run ``command`` (an ``xattn ...`` line) in ``folder``; the run folder it wrote."""
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    written = re.findall(r"wrote (\S+)", result.output)
    assert written, result.output
    return folder / written[-1]


def draws_its_prompt(path: Path, prompt: str) -> bool:
    with Image.open(path) as image:
        return drawn_as_named(as_rgb(image), prompt)


def test_the_docs_show_commands_of_every_kind():
    kinds = {command.split()[1] for command in documented_commands()}
    assert kinds == {"generate", "maps", "edit"}


@pytest.mark.parametrize("command", documented_commands())
def test_a_documented_command_draws_what_it_says(command, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    folder = run(command, tmp_path)
    words = shlex.split(command)
    if words[1] in ("generate", "maps"):
        images = sorted(folder.glob("image*.png"))
        assert images
        for image in images:
            assert draws_its_prompt(image, words[2]), f"{command}: {image.name} does not show {words[2]!r}"
    else:
        source, target = words[words.index("--source") + 1], words[words.index("--target") + 1]
        assert draws_its_prompt(folder / "source.png", source)
        (before, _), (after, _) = [pair for pair in zip(object_words(source), object_words(target)) if pair[0] != pair[1]][0]
        with Image.open(folder / "source.png") as first, Image.open(folder / "target.png") as second:
            case = colour_swap(0, first, second, None, before, after)
        assert case.kept, f"{command}: the {before} object lost its mask (IoU {case.iou:.2f}) or kept its colour"


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_the_model_cards_python_example_runs_verbatim(tmp_path, name):
    import os
    import subprocess
    import sys

    from xattn.world import model_path

    blocks = re.findall(r"```python\n(.*?)```", (model_path(name) / "README.md").read_text(), flags=re.S)
    assert blocks
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path,
                                env=environment, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

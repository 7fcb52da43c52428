"""The measurement commands the docs show (``python scripts/...`` in their bash blocks) are accepted as written.

They take minutes to hours, so the suite does not run them to the end: each is parsed by its own script's
argument parser, and a flag that does not exist or a value it refuses fails here.
"""

from __future__ import annotations

import argparse
import shlex

import pytest

from doc_blocks import ROOT, code_blocks
from test_scripts import load_script


def _script_commands() -> list[tuple[str, int, list[str]]]:
    commands = []
    for path, line, code in code_blocks("bash"):
        lines = code.replace("\\\n", " ").splitlines()  # a command continued with a backslash is one line
        for offset, text in enumerate(lines):
            if text.startswith("python scripts/"):
                commands.append((path, line + 1 + offset, shlex.split(text, comments=True)[1:]))
    return commands


class _Parsed(Exception):
    pass


COMMANDS = _script_commands()


def test_the_docs_show_the_measurement_commands():
    shown = {words[0] for _, _, words in COMMANDS}
    assert {"scripts/bench_guidance.py", "scripts/bench_guide_pass.py", "scripts/eval_edits.py"} <= shown


@pytest.mark.parametrize("path, line, words", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_a_documented_script_command_parses(path, line, words, monkeypatch):
    script = ROOT / words[0]
    assert script.is_file(), f"{path}:{line} names {words[0]}, which does not exist"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = load_script(script.stem)
    with pytest.raises(_Parsed):
        module.main(words[1:])

"""The typer app: optional command modules, shared options on every command, `python -m xattn`."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import xattn.cli as cli_package
from xattn.cli import app

SHARED = ("--model", "--device", "--dtype", "--scheduler", "--steps", "--guidance", "--size")


def test_absent_command_modules_are_skipped(monkeypatch):
    monkeypatch.setattr(cli_package, "COMMANDS", ("generate", "not_written_yet"))
    fresh = typer.Typer()
    assert cli_package._register_all(fresh) == ["generate"]


def test_other_import_errors_are_raised(monkeypatch):
    real = importlib.import_module

    def broken(name, *args):
        if name == "xattn.cli.broken":
            raise ModuleNotFoundError("No module named 'missing_dependency'", name="missing_dependency")
        return real(name, *args)

    monkeypatch.setattr(cli_package.importlib, "import_module", broken)
    monkeypatch.setattr(cli_package, "COMMANDS", ("broken",))
    with pytest.raises(ModuleNotFoundError, match="missing_dependency"):
        cli_package._register_all(typer.Typer())


def test_registered_commands_share_the_generation_options():
    runner = CliRunner()
    assert {"generate", "sites", "sweep"} <= set(cli_package.REGISTERED)
    for name in cli_package.REGISTERED:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        if name not in ("sites", "report"):
            missing = [option for option in SHARED if option not in result.output]
            assert not missing, f"{name} lacks {missing}"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "xattn", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Usage: xattn" in result.stdout

"""The typer app: every command registered, shared options on every command, `python -m xattn`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import xattn.cli as cli_package
from xattn.cli import app

SHARED = ("--model", "--device", "--dtype", "--scheduler", "--steps", "--guidance", "--size")


def test_every_command_is_registered():
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert names == set(cli_package.COMMANDS)


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


def test_version():
    import xattn

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"xattn {xattn.__version__}"


# Each generating command, with its own minimal arguments.
PROMPT_COMMANDS = {
    "generate": ["a red circle"],
    "maps": ["a red circle"],
    "reweight": ["a (red:2) circle"],
}


@pytest.mark.parametrize("command", [c for c in PROMPT_COMMANDS if c in cli_package.REGISTERED])
def test_every_generating_command_names_a_missing_model(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [command, *PROMPT_COMMANDS[command], "--model", str(tmp_path / "gone"),
                                      "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "gone" in result.output
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("command", [c for c in PROMPT_COMMANDS if c in cli_package.REGISTERED])
def test_every_generating_command_refuses_an_existing_out(command, sd1_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "earlier.txt").write_text("keep")
    result = CliRunner().invoke(app, [command, *PROMPT_COMMANDS[command], "--model", str(sd1_path),
                                      "--steps", "1", "--size", "32", "--out", "taken"])
    assert result.exit_code == 2 and "pass a new folder" in result.output, result.output
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["earlier.txt"]


def test_help_and_example_config_recommend_a_launcher_that_starts_two_processes():
    """accelerate's --cpu launcher starts one process without MPI; --multi_gpu starts N (gloo on a CPU)."""
    from pathlib import Path

    from typer.testing import CliRunner

    runner = CliRunner()
    texts = [runner.invoke(app, ["--help"]).output, runner.invoke(app, ["sweep", "--help"]).output,
             (Path(__file__).resolve().parents[1] / "configs" / "sweep-example.yaml").read_text()]
    for text in texts:
        assert "accelerate launch --cpu" not in text
        assert "accelerate launch --multi_gpu --num_processes 2" in text

"""Shared fixtures: tiny saved-and-reloaded pipelines, one CPU thread, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ.get("XATTN_TEST_THREADS", "1")))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def sd1_path(tmp_path_factory):
    return tiny_models.build_sd(tmp_path_factory.mktemp("sd1"), tiny_models.sd1_unet())


@pytest.fixture(scope="session")
def sd2_path(tmp_path_factory):
    return tiny_models.build_sd(tmp_path_factory.mktemp("sd2"), tiny_models.sd2_unet())


@pytest.fixture(scope="session")
def sdxl_path(tmp_path_factory):
    return tiny_models.build_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture
def sd1_pipe(sd1_path):
    return tiny_models.load_sd(sd1_path)


@pytest.fixture
def sd2_pipe(sd2_path):
    return tiny_models.load_sd(sd2_path)


@pytest.fixture
def sdxl_pipe(sdxl_path):
    return tiny_models.load_sdxl(sdxl_path)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def any_pipe(request):
    """Each architecture in turn."""
    return request.getfixturevalue(f"{request.param}_pipe")


@pytest.fixture(scope="session")
def world_pipe():
    """The shipped shapes-world pipeline, loaded once for every world test. Tests must not change it."""
    from xattn import runner

    return runner.load_pipeline(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def world_settings() -> dict:
    """The shipped model's recommended sampling settings: ``{"steps": 25, "guidance": 4.0}``."""
    from xattn import runner
    from xattn.world import model_path

    defaults = runner.model_defaults(model_path())
    return {"steps": int(defaults["steps"]), "guidance": float(defaults["guidance"])}


@pytest.fixture(scope="session")
def world_defaults() -> dict:
    """The shipped model's ``xattn_defaults.json`` as written (diffusers' argument names)."""
    import json

    from xattn.world import model_path

    return json.loads((model_path() / "xattn_defaults.json").read_text())


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Invoke the xattn app in a scratch working directory (default run folders land in tmp/outputs)."""
    from typer.testing import CliRunner

    from xattn.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])

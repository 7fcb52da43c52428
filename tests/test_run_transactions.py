"""Run folders: nothing written before inputs are checked; a failed or interrupted run never blocks its --out;
finished runs are never touched; files follow the umask; the manifest holds the user's options and the threads."""

from __future__ import annotations

import json
import os

import pytest
import torch

from xattn.capture import pictures

FAST = ["--steps", "2", "--size", "32", "--no-progress"]


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_unknown_word_leaves_no_folder_and_the_out_stays_free(cli, sd1_path, tmp_path):
    refused = cli("maps", "a red circle", "-m", sd1_path, "-t", "blue", "--out", "m", *FAST)
    assert refused.exit_code == 2 and not (tmp_path / "m").exists()
    assert cli("maps", "a red circle", "-m", sd1_path, "-t", "red", "--out", "m", *FAST).exit_code == 0
    assert manifest(tmp_path / "m")["status"] == "finished"


def test_interrupted_run_is_marked_and_its_out_reused(cli, sd1_path, tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pictures, "word_grid", ctrl_c)
    interrupted = cli("maps", "a red circle", "-m", sd1_path, "--out", "m", *FAST)
    assert interrupted.exit_code != 0
    record = manifest(tmp_path / "m")
    assert record["status"] == "failed" and "interrupted" in record["error"]
    assert "image-0.png" in record["outputs"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    again = cli("maps", "a red circle", "-m", sd1_path, "--out", "m", *FAST)
    assert again.exit_code == 0, again.output
    assert manifest(tmp_path / "m")["status"] == "finished" and (tmp_path / "m" / "report.html").is_file()


def test_a_killed_run_needs_overwrite_failed_and_foreign_files_are_kept(cli, sd1_path, tmp_path):
    killed = tmp_path / "k"
    killed.mkdir()
    (killed / "manifest.json").write_text(json.dumps({"status": "running", "outputs": ["image-0.png"]}))
    (killed / "image-0.png").write_bytes(b"half")
    refused = cli("generate", "x", "-m", sd1_path, "--out", killed, *FAST)
    assert refused.exit_code == 2 and "--overwrite-failed" in refused.output
    assert (killed / "image-0.png").read_bytes() == b"half"
    reused = cli("generate", "x", "-m", sd1_path, "--out", killed, "--overwrite-failed", *FAST)
    assert reused.exit_code == 0, reused.output
    assert manifest(killed)["status"] == "finished" and (killed / "image-0.png").read_bytes() != b"half"
    failed = tmp_path / "f"
    failed.mkdir()
    (failed / "manifest.json").write_text(json.dumps({"status": "failed", "outputs": []}))
    (failed / "notes.txt").write_text("mine")
    kept = cli("generate", "x", "-m", sd1_path, "--out", failed, *FAST)
    assert kept.exit_code == 2 and "notes.txt" in kept.output and (failed / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(cli, sd1_path, tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        assert cli("generate", "x", "-m", sd1_path, "--out", "u", *FAST).exit_code == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "u").iterdir():
        assert path.stat().st_mode & 0o777 == mode, path.name


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_manifest_settings_are_the_options_and_the_chosen_threads(cli, sd1_path, tmp_path, keep_threads):
    assert cli("generate", "x", "-m", sd1_path, "--out", "g", *FAST).exit_code == 0
    settings = manifest(tmp_path / "g")["settings"]
    assert all(isinstance(value, (str, int, float, bool, type(None))) for value in settings.values()), settings
    assert not any(key[0].isupper() for key in settings)  # no imported names such as ReweightError
    assert settings["threads"] == 1  # the tiny model on the CPU
    assert cli("generate", "x", "-m", sd1_path, "--out", "t", "--threads", 3, *FAST).exit_code == 0
    assert manifest(tmp_path / "t")["settings"]["threads"] == 3


def test_threads_follow_the_model_size(tmp_path, sd1_path, keep_threads):
    from xattn.app.threads import SMALL_MODEL_BYTES, TORCH_DEFAULT, choose_threads

    cpu = torch.device("cpu")
    assert choose_threads(sd1_path, cpu) == 1
    assert choose_threads(sd1_path, cpu, requested=4) == 4
    assert choose_threads(sd1_path, torch.device("cuda")) == TORCH_DEFAULT
    big = tmp_path / "big" / "unet"
    big.mkdir(parents=True)
    with open(big / "diffusion_pytorch_model.safetensors", "wb") as file:  # sparse: no disk is used
        file.truncate(SMALL_MODEL_BYTES + 1)
    assert choose_threads(tmp_path / "big", cpu) == TORCH_DEFAULT

"""Sweeps under `accelerate launch`: two processes split the grid, each job runs exactly once.

accelerate's ``--cpu`` launcher starts several processes only through MPI;
its torchrun launcher (``--multi_gpu``) starts N processes on any machine, and
xattn joins them over gloo when there is no GPU. Both launches are tested:
the torchrun one must split the grid between two ranks, the ``--cpu`` one
(the command in the docs) must still complete the grid exactly once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter


GRID = {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "words": ["a"], "weights": [0.5, 2.0]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, sd1_path, mode: str, out: str):
    config = tmp_path / "sweep.yaml"
    lines = ["job: reweight", f"model: {sd1_path}", "steps: 2", "size: 32", "grid:"]
    config.write_text("\n".join(lines + [f"  {k}: {json.dumps(v)}" for k, v in GRID.items()]) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               "-m", "xattn", "sweep", str(config), "--out", str(tmp_path / out), "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, tmp_path / out


def planned_and_done(folder):
    planned = [entry["job"] for entry in json.loads((folder / "plan.json").read_text())["jobs"]]
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return planned, records


def test_two_processes_split_the_grid_each_job_once(tmp_path, sd1_path):
    result, folder = launch(tmp_path, sd1_path, "--multi_gpu", "two")
    planned, records = planned_and_done(folder)
    assert len(planned) == 8
    assert Counter(r["job"] for r in records) == Counter(planned)  # the union is the grid, each once
    by_rank = Counter(r["rank"] for r in records)
    assert by_rank == {0: 4, 1: 4}  # accelerate's own even split
    assert result.stdout.count("ran 4 jobs here") == 2
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2
    assert (folder / "contact-sheet.png").is_file()


def test_cpu_launcher_completes_the_grid_once(tmp_path, sd1_path):
    result, folder = launch(tmp_path, sd1_path, "--cpu", "cpu")
    planned, records = planned_and_done(folder)
    assert [r["job"] for r in records] == planned
    if sum(1 for line in result.stdout.splitlines() if "jobs here" in line) == 1:
        assert "accelerate started one CPU process" in result.stderr  # said plainly, not silently

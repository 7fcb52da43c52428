"""A sweep's folder: its plan, one done-record per finished job, and what is rebuilt from them.

A job is finished when ``jobs/<name>.json`` parses, names the job, and its
image opens; anything less (a record cut short by a crash, an image deleted
or damaged by hand) makes the job run again on resume, with a warning naming
the file. ``results.jsonl`` and ``contact-sheet.png`` are always rebuilt from
the valid records only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..files import OverwriteError, save_image_atomic, write_text_atomic
from .runfolder import MANIFEST

PLAN = "plan.json"
RESULTS = "results.jsonl"
CONTACT_SHEET = "contact-sheet.png"
JOBS_DIR = "jobs"
IMAGES_DIR = "images"
PLAN_SETTINGS = ("model", "scheduler", "dtype", "steps", "guidance", "size", "negative_prompt", "sites", "syntax",
                 "guide")  # guide: the config's attention guidance (its Guide's record), None without
# What a plan written before a setting existed meant by it (sweeps made before `syntax:` read A1111 prompts).
PLAN_DEFAULTS = {"syntax": "a1111"}


def done_record(folder: Path, job) -> Path:
    return folder / JOBS_DIR / f"{job.name}.json"


def image_path(folder: Path, job) -> Path:
    return folder / IMAGES_DIR / f"{job.name}.png"


def _problem(folder: Path, job) -> tuple[dict | None, str | None]:
    """(the job's record, None) when it is finished; (None, what is wrong) when it is damaged; (None, None) when not run."""
    from PIL import Image

    path = done_record(folder, job)
    if not path.exists():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"{path} does not parse ({error})"
    if not isinstance(record, dict) or record.get("job") != job.name:
        return None, f"{path} is not the record of job {job.name}"
    image = image_path(folder, job)
    try:
        with Image.open(image) as opened:
            opened.load()
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"{image} is missing or unreadable ({error})"
    return record, None


def valid_records(folder: Path, jobs: Sequence, *, warn: Callable[[str], None] | None = None) -> dict[str, dict]:
    """The records of finished jobs, by job name, in plan order; ``warn`` hears of each damaged one."""
    records: dict[str, dict] = {}
    for job in jobs:
        record, problem = _problem(folder, job)
        if record is not None:
            records[job.name] = record
        elif problem and warn is not None:
            warn(f"warning: job {job.name} runs again: {problem}")
    return records


def print_warning(message: str) -> None:
    print(message, file=sys.stderr)


def plan_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide a sweep's pixels besides the jobs: a resumed sweep must keep them."""
    return {key: settings.get(key) for key in PLAN_SETTINGS}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OverwriteError(f"{path} cannot be read as JSON ({error}); pass a new --out folder") from None


def check_existing_folder(folder: Path, jobs: Sequence, settings: Mapping[str, Any] | None = None) -> None:
    """A sweep may reopen only a folder holding the same plan and settings (or an empty one).

    Raises:
        OverwriteError: the folder is a file, holds other files, another sweep's plan,
            or this sweep made with other settings.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OverwriteError(f"--out {folder} exists and is a file; pass a new folder")
    if not any(folder.iterdir()):
        return
    plan = folder / PLAN
    if not plan.is_file():
        raise OverwriteError(f"--out {folder} exists, is not empty and holds no sweep ({PLAN}); pass a new folder")
    stored_plan = _read_json(plan)
    try:
        stored = [entry["job"] for entry in stored_plan["jobs"]]
    except (KeyError, TypeError):
        raise OverwriteError(f"{plan} is not a sweep plan; pass a new --out folder") from None
    if stored != [job.name for job in jobs]:
        raise OverwriteError(
            f"--out {folder} holds a different sweep ({len(stored)} jobs, not these {len(jobs)}); "
            "pass a new folder, or the config that made it to resume")
    if settings is not None:
        before, now = {**PLAN_DEFAULTS, **stored_plan.get("settings", {})}, plan_settings(settings)
        changed = {key: (before.get(key), now.get(key)) for key in now if before.get(key) != now.get(key)}
        if changed:
            detail = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise OverwriteError(f"--out {folder} holds this sweep made with other settings ({detail}); "
                                 "resume it with the same settings, or pass a new folder")


def merge_results(folder: Path, jobs: Sequence) -> list[dict[str, Any]]:
    """Write ``results.jsonl``: one line per finished job, in plan order."""
    records = list(valid_records(folder, jobs).values())
    write_text_atomic(folder / RESULTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records


def contact_sheet(folder: Path, jobs: Sequence):
    """One labelled grid of every finished image: rows prompt x seed, columns the other axes."""
    from PIL import Image

    from ..grid import labelled_grid

    done = valid_records(folder, jobs)
    row_keys = list(dict.fromkeys((job.prompt, job.seed) for job in jobs))
    col_keys = list(dict.fromkeys((job.word, job.weight, job.mode, job.window) for job in jobs))
    cells: dict[tuple, Any] = {}
    size = None
    for job in jobs:
        if job.name in done:
            with Image.open(image_path(folder, job)) as image:
                cells[(job.prompt, job.seed, job.word, job.weight, job.mode, job.window)] = image.convert("RGB")
                size = size or image.size
    if size is None:
        return None
    blank = Image.new("RGB", size, (128, 128, 128))
    rows = [[cells.get((p, s, *c), blank) for c in col_keys] for p, s in row_keys]
    col_labels = [" ".join(str(v) for v in c if v is not None) or "image" for c in col_keys]
    row_labels = [f"{p[:28]} | seed {s}" for p, s in row_keys]
    sheet = labelled_grid(rows, row_labels=row_labels, col_labels=col_labels, title=f"{len(done)}/{len(jobs)} jobs",
                          cell_scale=2 if max(size) <= 128 else 1)  # small images: room for the labels
    save_image_atomic(sheet, folder / CONTACT_SHEET)
    return sheet


def earlier_runs(folder: Path) -> list[dict[str, Any]]:
    """Summaries of the runs that wrote this folder before, from its manifest (a damaged one is skipped)."""
    path = folder / MANIFEST
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict):
        return []
    summary = {key: previous.get(key) for key in ("created_utc", "status", "timings", "finished_jobs", "processes")}
    return [*previous.get("earlier_runs", []), summary]

"""Sweeps: a grid of generation jobs, resumable, split across processes by accelerate.

A sweep config lists a grid (prompts x seeds x words x weights x modes x step
windows) and a job kind. :func:`plan_jobs` turns it into a list of
:class:`Job` in a fixed order, each with a stable name, so every process and
every rerun sees the same list. :func:`run_sweep` then

1. loads the pipeline once per process and checks every word against its prompt;
2. makes (or reopens) the run folder and records the plan in ``plan.json``;
3. drops the jobs that already have a valid done-record (``jobs/<name>.json``
   that parses, with an image that opens), so a rerun of a killed sweep redoes
   nothing and loses nothing; a damaged record or image is run again, with a
   warning naming the file (:mod:`.sweepfolder`);
4. splits the rest with ``accelerate.PartialState().split_between_processes``
   (one process without ``accelerate launch``);
5. runs each job, saves its PNG, then writes its done-record atomically: a job
   counts as finished only once that record exists;
6. on the main process, after every process is done, merges the records into
   ``results.jsonl`` in plan order, and draws ``contact-sheet.png``, both from
   the valid records only.

A job kind is a small function ``(pipe, job, settings) -> (image, info)``,
registered in :data:`JOB_KINDS`.

``settings["guide"]`` (a config's ``guide:``, as :func:`.config.guide_value`
records it) guides every job the way ``xattn generate`` does (a reweight job:
its Reweight and the Guide together); the job's PNG and done-record hold the
Guide's record, so ``xattn generate --from-png`` repeats the image.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import validate
from ..files import save_image_atomic, write_json_atomic, write_text_atomic
from . import runner
from .config import ConfigError
from .pngmeta import image_parameters, png_info
from .runfolder import Timings, build_manifest, create_run_folder, write_manifest
from .sweepfolder import (
    IMAGES_DIR,
    PLAN,
    check_existing_folder,
    contact_sheet,
    done_record,
    earlier_runs,
    merge_results,
    plan_settings,
    print_warning,
    valid_records,
)
from .sweepjobs import JOB_KINDS, JobFn, _syntax, check_guide, check_words  # noqa: F401 (re-exported)
from .threads import apply_threads, choose_threads

GRID_KEYS = ("prompts", "seeds", "words", "weights", "modes", "step_windows")


@dataclass(frozen=True)
class Job:
    """One cell of the grid: everything that decides its image."""

    index: int
    kind: str
    prompt: str
    seed: int
    word: str | None = None
    weight: float | None = None
    mode: str | None = None
    window: str | None = None  # step window, "0:0.5" or "2:10"; None = every step

    def params(self) -> dict[str, Any]:
        """The job's settings without its index."""
        data = asdict(self)
        data.pop("index")
        return data

    @property
    def name(self) -> str:
        """A stable name: the position in the grid and a digest of the settings."""
        digest = hashlib.sha1(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.index:04d}-{digest}"


# -- planning -------------------------------------------------------------------------------

def _seed_list(value: Any) -> list[int]:
    try:
        return validate.seed_list(value)
    except validate.OptionError as error:
        raise ValueError(f"a range such as 0:4 or a list of seeds ({error})") from None


def _text_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise ValueError("a non-empty list of non-empty strings")
    return list(items)


def _number_list(value: Any) -> list[float]:
    if isinstance(value, str) or (isinstance(value, list) and not value):
        raise ValueError("a non-empty list of numbers")
    try:
        return validate.weight_list(value)
    except validate.OptionError as error:
        raise ValueError(f"a non-empty list of numbers, finite in float32 ({error})") from None


def _window_list(value: Any) -> list[str | None]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(item is None or isinstance(item, str) for item in items):
        raise ValueError('a list of step windows such as "0:0.5" or "2:10" (null: every step)')
    return list(items)


def _mode_list(value: Any) -> list[str]:
    modes = _text_list(value)
    from ..reweight import MODES

    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"a list of reweight modes ({', '.join(MODES)}); {mode!r} is not one")
    return modes


_GRID_CHECKS: dict[str, Callable[[Any], list]] = {
    "prompts": _text_list, "seeds": _seed_list, "words": _text_list,
    "weights": _number_list, "modes": _mode_list, "step_windows": _window_list,
}


def check_grid(grid: Any, kind: str, *, source: str = "config") -> dict[str, list]:
    """Validate a sweep's ``grid`` mapping for a job kind; errors name the key.

    Args:
        grid: the ``grid:`` mapping of the config.
        kind: the job kind, which decides which keys are needed or allowed.
        source: the config file's name, for messages.

    Raises:
        ConfigError: a missing, unknown or badly typed grid key.
    """
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{source}: key 'grid' must be a mapping of {', '.join(GRID_KEYS)}")
    allowed = {"generate": ("prompts", "seeds"), "reweight": GRID_KEYS}.get(kind, GRID_KEYS)
    required = {"generate": ("prompts", "seeds"), "reweight": ("prompts", "seeds", "words", "weights")}.get(
        kind, ("prompts", "seeds"))
    cleaned: dict[str, list] = {}
    for key, value in grid.items():
        if key not in GRID_KEYS:
            raise ConfigError(f"{source}: unknown key 'grid.{key}'; grid keys are {', '.join(GRID_KEYS)}")
        if key not in allowed:
            raise ConfigError(f"{source}: key 'grid.{key}' has no meaning for job: {kind}; "
                              f"it allows {', '.join(allowed)}")
        try:
            cleaned[key] = _GRID_CHECKS[key](value)
        except ValueError as error:
            raise ConfigError(f"{source}: key 'grid.{key}' must be {error}, not {value!r}") from None
    for key in required:
        if key not in cleaned:
            raise ConfigError(f"{source}: key 'grid.{key}' is missing; job: {kind} needs {', '.join(required)}")
    return cleaned


def plan_jobs(grid: Mapping[str, list], kind: str) -> list[Job]:
    """Every job of the grid, in one fixed order (prompts, then seeds, words, weights, modes, windows).

    Args:
        grid: a grid checked by :func:`check_grid`.
        kind: a key of :data:`JOB_KINDS`.
    """
    if kind not in JOB_KINDS:
        raise ConfigError(f"unknown job kind {kind!r}; kinds are {', '.join(JOB_KINDS)}")
    axes = (
        grid["prompts"], grid["seeds"], grid.get("words", [None]), grid.get("weights", [None]),
        grid.get("modes", ["scale"] if kind == "reweight" else [None]), grid.get("step_windows", [None]),
    )
    return [
        Job(index, kind, prompt, seed, word, weight, mode, window)
        for index, (prompt, seed, word, weight, mode, window) in enumerate(itertools.product(*axes))
    ]


def _parameters_text(pipe, job: Job, settings: Mapping[str, Any], image, info: Mapping[str, Any]) -> str:
    own = {"job": job.name, **{k: v for k, v in job.params().items() if v is not None and k not in ("prompt", "seed")},
           **info}  # e.g. the Reweight controller, so `xattn generate --from-png` can repeat the image
    return image_parameters(pipe, dict(settings), command="sweep", prompt=job.prompt, seed=job.seed, image=image,
                            own=own)


def run_job(pipe, job: Job, settings: Mapping[str, Any], folder: Path, *, rank: int = 0,
            job_kinds: Mapping[str, JobFn] | None = None) -> dict[str, Any]:
    """Run one job, save its image, then record it as done (atomically, last).

    Args:
        pipe: the loaded pipeline.
        job: the job to run.
        settings: merged generation settings.
        folder: the sweep's run folder.
        rank: this process's index, recorded with the result.
        job_kinds: job functions by kind (defaults to :data:`JOB_KINDS`).

    Returns:
        The done-record, also written to ``jobs/<name>.json``.
    """
    start = time.perf_counter()
    image, info = (job_kinds or JOB_KINDS)[job.kind](pipe, job, settings)
    image_name = f"{IMAGES_DIR}/{job.name}.png"
    save_image_atomic(image, folder / image_name, pnginfo=png_info(_parameters_text(pipe, job, settings, image, info)))
    record = {"job": job.name, **asdict(job), "image": image_name, "rank": rank,
              "seconds": round(time.perf_counter() - start, 4), **info}
    write_json_atomic(done_record(folder, job), record)
    return record


# -- running ----------------------------------------------------------------------------------

def _wants_cpu(device: str) -> bool:
    """Whether processes should join over CPU (gloo): asked for, or no GPU to use."""
    import torch

    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return asked or device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _warn_if_one_cpu_process(state) -> None:
    """Say so when ``accelerate launch --cpu --num_processes N`` started a single process.

    accelerate's plain launcher starts several CPU processes only through MPI
    (``--mpirun_hostfile``); without it, one process runs every job (still
    correctly). torchrun-based launching gives N CPU processes over gloo.
    """
    if (state.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
            and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ):
        print("xattn sweep: accelerate started one CPU process (its --cpu launcher needs MPI for more); "
              "this process runs every job. For N CPU processes without MPI use "
              "`accelerate launch --multi_gpu --num_processes N -m xattn sweep ...`.", file=sys.stderr)


@dataclass
class SweepResult:
    """What one process's :func:`run_sweep` did."""

    folder: Path
    ran: list[str]  # names of the jobs this process ran
    skipped: list[str]  # names of jobs already done when this run started
    total: int


def run_sweep(settings: Mapping[str, Any], jobs: Sequence[Job], *, out: str | Path | None = None,
              slug: str = "", progress: bool = True, job_kinds: Mapping[str, JobFn] | None = None) -> SweepResult:
    """Run (or resume) a sweep in this process, sharing the jobs with accelerate's other processes.

    Args:
        settings: merged generation settings (model, device, dtype, scheduler, steps, guidance, size...).
        jobs: from :func:`plan_jobs`.
        out: the folder; an existing one with the same plan resumes. None: a new ``outputs/sweep-...``.
        slug: words for a new folder's name.
        progress: show a job progress bar.
        job_kinds: job functions by kind (defaults to :data:`JOB_KINDS`).

    Raises:
        RunFolderError: ``out`` holds something other than this sweep.
        TokenError: a job's word is not in its prompt.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    device = settings.get("device") or "auto"
    state = PartialState(cpu=_wants_cpu(device))
    _warn_if_one_cpu_process(state)
    timings = Timings()
    if out is not None:  # every process checks the same folder the same way: all fail or none
        check_existing_folder(Path(out), jobs, settings)
    if state.num_processes > 1 and device in ("auto", state.device.type):
        device = str(state.device)  # each process on its own GPU (or the CPU)
    settings = dict(settings)
    settings["threads"] = apply_threads(choose_threads(runner.resolve_model(settings.get("model")),
                                                       runner.resolve_device(device), settings.get("threads")))
    with timings.phase("load"):
        pipe = runner.load_pipeline(settings.get("model"), device=device, dtype=settings.get("dtype") or "auto",
                                    scheduler=settings.get("scheduler"))
    check_words(pipe, jobs, _syntax(settings))
    check_guide(pipe, jobs, settings)

    folder_box: list[Any] = [None]
    if state.is_main_process:
        folder = create_run_folder("sweep", slug=slug, out=out, resume=True)
        if not (folder / PLAN).is_file():
            write_json_atomic(folder / PLAN, {"settings": plan_settings(settings),
                                              "jobs": [{"job": job.name, **asdict(job)} for job in jobs]})
        folder_box[0] = str(folder)
    folder = Path(broadcast_object_list(folder_box)[0])
    if state.is_main_process:
        print(f"sweep folder: {folder} (if it stops early, rerun with --out {folder} to resume)", file=sys.stderr)

    state.wait_for_everyone()  # every process lists the done jobs before any writes new ones
    already = set(valid_records(folder, jobs, warn=print_warning if state.is_main_process else None))
    todo = [job for job in jobs if job.name not in already]
    history = earlier_runs(folder) if state.is_main_process else []  # a resumed sweep keeps its past
    if state.is_main_process:
        write_manifest(folder, build_manifest("sweep", dict(settings), model=pipe.xattn_identity, status="running",
                                              extra={"jobs": len(jobs), "already_done": len(already),
                                                     "earlier_runs": history}))
    state.wait_for_everyone()

    ran: list[str] = []
    status = "failed"
    try:
        with state.split_between_processes(todo) as mine:
            bar = tqdm(mine, desc=f"sweep jobs (process {state.process_index})", disable=not progress,
                       position=state.process_index, leave=True)
            with timings.phase("jobs"):
                for job in bar:
                    run_job(pipe, job, settings, folder, rank=state.process_index, job_kinds=job_kinds)
                    ran.append(job.name)
        state.wait_for_everyone()
        status = "finished"
    finally:
        if state.is_main_process:
            records = merge_results(folder, jobs)
            if status == "finished":
                with timings.phase("contact_sheet"):
                    contact_sheet(folder, jobs)
            write_manifest(folder, build_manifest(
                "sweep", dict(settings), model=pipe.xattn_identity, timings=timings.as_dict(), status=status,
                extra={"jobs": len(jobs), "finished_jobs": len(records), "already_done": len(already),
                       "processes": state.num_processes, "earlier_runs": history}))
    return SweepResult(folder, ran, sorted(already), len(jobs))

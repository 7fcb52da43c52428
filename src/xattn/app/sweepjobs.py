"""The kinds of sweep job: ``(pipe, job, settings) -> (image, info)``, and the checks made before any runs.

- ``generate``: an image of the job's prompt and seed, guided by the sweep's
  ``guide:`` when it has one, as ``xattn generate`` guides;
- ``reweight``: one cell of ``xattn reweight``'s grid (the job's word at its
  weight, mode and step window), also guided by ``guide:`` when given: the
  Reweight and the Guide in one session, in that order, as ``xattn generate
  --from-png`` repeats the cell. The Guide reads the model's own maps (its
  gradient pass runs its hooks only), so the reweighting changes the
  denoising, not what the guidance aims at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from . import runner
from .config import guide_from_config

if TYPE_CHECKING:
    from .sweep import Job


JobFn = Callable[[Any, "Job", Mapping[str, Any]], tuple[Any, dict]]


def _generate_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {k: settings.get(k) for k in ("steps", "guidance", "size")}
    if settings.get("negative_prompt"):
        kwargs["negative_prompt"] = settings["negative_prompt"]
    return kwargs


def _syntax(settings: Mapping[str, Any]) -> str:
    """The dialect the sweep's prompts are written in (the config's ``syntax:``, A1111's by default)."""
    return settings.get("syntax") or "a1111"


def _prompted_kwargs(pipe, prompt: str, settings: Mapping[str, Any], literal: bool = False) -> dict[str, Any]:
    """:func:`_generate_kwargs` with the prompts read in the sweep's syntax (weights, BREAK, long prompts)."""
    from ..prompts.pipeline import prompt_kwargs

    kwargs = _generate_kwargs(settings)
    negative = kwargs.pop("negative_prompt", None)
    kwargs.update(prompt_kwargs(pipe, [prompt], [negative] if negative else None, syntax=_syntax(settings),
                                literal=literal))
    kwargs.pop("prompt", None)
    return kwargs


def generate_job(pipe, job: Job, settings: Mapping[str, Any]) -> tuple[Any, dict]:
    """An image of the job's prompt and seed: plain, or guided by the sweep's ``guide:`` as ``xattn generate`` guides."""
    guide = guide_from_config(settings.get("guide"))
    if guide is None:
        return runner.generate(pipe, job.prompt, seed=job.seed, **_prompted_kwargs(pipe, job.prompt, settings))[0], {}
    from ..prompts.pipeline import hook_names
    from ..session import hooks

    negative = settings.get("negative_prompt")
    names = hook_names(pipe, [job.prompt], [negative] if negative else None, syntax=_syntax(settings))
    with hooks(pipe, guide, **names):  # the rows of weighted or long prompts named, as generate names them
        image = runner.generate(pipe, job.prompt, seed=job.seed, **_prompted_kwargs(pipe, job.prompt, settings))[0]
    return image, {"guide": guide.to_dict()}


def reweight_job(pipe, job: Job, settings: Mapping[str, Any]) -> tuple[Any, dict]:
    """The job's word reweighted by its weight, mode and step window: one cell of ``xattn reweight``'s grid.

    The sweep's ``guide:``, if any, steers the cell too, as ``xattn generate --from-png`` repeats it: the
    Reweight and the Guide in one session, in that order.
    """
    from .reweight_sweep import run_sweep as reweight_cells

    def generate(clean_prompt: str, first: int, count: int) -> list:
        return runner.generate(pipe, clean_prompt, seed=first, num_images_per_prompt=count,
                               **_prompted_kwargs(pipe, clean_prompt, settings, literal=True))

    guide = guide_from_config(settings.get("guide"))
    (cell,) = reweight_cells(pipe, job.prompt, generate, word=job.word, weights=[job.weight],
                             modes=[job.mode or "scale"], seeds=[job.seed], steps=job.window,
                             selector=settings.get("sites"), syntax=_syntax(settings), guide=guide)
    return cell.image, {"reweight": cell.reweight, **({"guide": guide.to_dict()} if guide is not None else {})}


JOB_KINDS: dict[str, JobFn] = {"generate": generate_job, "reweight": reweight_job}


def check_words(pipe, jobs: Sequence[Job], syntax: str = "a1111") -> None:
    """Fail before any job runs if a job's word is not in its prompt as ``syntax`` reads it (raises TokenError)."""
    from ..prompts import parse_prompt
    from ..tokens import TokenMap

    tokenizer = getattr(pipe, "tokenizer", None)
    pairs = {(job.prompt, job.word) for job in jobs if job.word is not None}
    if tokenizer is None:
        return
    for prompt, word in sorted(pairs):
        TokenMap(tokenizer, parse_prompt(prompt, syntax=syntax).text).indices(word)


def check_guide(pipe, jobs: Sequence[Job], settings: Mapping[str, Any]) -> None:
    """Fail before any job runs if the sweep's guidance would do nothing or names a word missing from a prompt.

    Raises:
        NothingSelectedError: ``guide.steps`` holds no step of the run.
        GuidanceError: ``guide.refine`` names a step the window leaves out.
        TokenError: a guided word is not in a job's prompt as the sweep's syntax reads it.
    """
    guide = guide_from_config(settings.get("guide"))
    if guide is None:
        return
    from ..prompts import parse_prompt
    from ..tokens import TokenMap

    guide.check_run(settings.get("steps"), "guide.steps", where="sweep", example='"0:N" with N <= steps')
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    words = list(dict.fromkeys(word for loss in guide.losses for word in loss.words()))
    for prompt in dict.fromkeys(job.prompt for job in jobs):
        token_map = TokenMap(tokenizer, parse_prompt(prompt, syntax=_syntax(settings)).text)
        for word in words:
            token_map.indices(word)


__all__ = ["JOB_KINDS", "JobFn", "check_guide", "check_words", "generate_job", "reweight_job"]

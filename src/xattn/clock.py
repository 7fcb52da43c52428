"""The step clock: which denoising step a denoiser call belongs to.

A step is the position of the call's timestep among the scheduler's
*distinct* timesteps, read from the call itself, never a count of layer
calls. So Heun's two calls at one noise level share a step, and DDIM, Euler,
DPM++ and flow-matching schedulers (whose timesteps are sigmas x 1000) all
count 0..N-1. Without a scheduler to read (a bare model call), distinct
timesteps are numbered in the order they arrive and the step count is
unknown.

Some pipelines pass the denoiser the scheduler's timestep divided by 1000
(Flux: ``timestep / 1000``, a sigma). The scale is learned once per run, from
where the scheduler says it is (``step_index``, else ``begin_index``), so a
sigma of 1.0 is never mistaken for a schedule's last timestep of 1.0.
"""

from __future__ import annotations

import torch


def _close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(1.0, abs(b))


class StepClock:
    """Maps timesteps to step indices for one scheduler at a time."""

    def __init__(self):
        self._key: tuple | None = None
        self._distinct: list[float] = []
        self._seen: list[float] = []  # arrival order, when there is no schedule
        self._relative = False
        self._offset: int | None = None  # schedule position of the run's first step
        self._scale: float | None = None  # schedule units per unit of the call's timestep (1 or 1000)

    def new_run(self, *, relative: bool = False) -> None:
        """Start counting a new run.

        ``relative``: step 0 is the first step the run actually takes (a
        pipeline run: img2img with ``strength < 1`` or an SDXL refiner starts
        part-way through the schedule), and the step count is the number of
        steps from there. Otherwise steps are positions in the whole schedule.
        """
        self._seen = []
        self._relative, self._offset, self._scale = relative, None, None

    def _schedule(self, scheduler) -> list[float] | None:
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        if timesteps is None or not len(timesteps):
            return None
        key = (id(timesteps), len(timesteps), float(timesteps[0]), float(timesteps[-1]))
        if key != self._key:
            distinct: list[float] = []
            for value in torch.as_tensor(timesteps).flatten().tolist():
                if not any(_close(value, seen, 1e-4) for seen in distinct):
                    distinct.append(value)
            self._distinct, self._key = distinct, key
        return self._distinct

    def _call_scale(self, timestep: float, scheduler, distinct: list[float]) -> float:
        """1, or 1000 where the call's timestep is the scheduler's / 1000; learned at a run's first call."""
        if self._scale is None:
            timesteps = scheduler.timesteps
            index = getattr(scheduler, "step_index", None)
            index = getattr(scheduler, "begin_index", None) if index is None else index
            if index is not None and 0 <= index < len(timesteps):  # the scheduler says where it is
                expected = float(timesteps[index])
                thousand = _close(timestep * 1000, expected, 1e-3) and not _close(timestep, expected, 1e-3)
            else:  # only one reading matches the schedule
                matches = [any(_close(timestep * scale, value, 1e-3) for value in distinct) for scale in (1, 1000)]
                thousand = matches == [False, True]
            self._scale = 1000.0 if thousand else 1.0
        return self._scale

    def step_of(self, timestep: float | None, scheduler) -> tuple[int | None, int | None]:
        """(step, number of steps) of a denoiser call at ``timestep``; (None, None) without a timestep."""
        if timestep is None:
            return None, None
        distinct = self._schedule(scheduler)
        if distinct:
            timestep = timestep * self._call_scale(timestep, scheduler, distinct)
        return self.step_at(timestep, scheduler)

    def step_at(self, timestep: float, scheduler) -> tuple[int | None, int | None]:
        """(step, number of steps) of one of the scheduler's own timesteps (a step-end callback's ``t``)."""
        distinct = self._schedule(scheduler)
        if distinct:
            nearest = min(range(len(distinct)), key=lambda i: abs(distinct[i] - timestep))
            if _close(distinct[nearest], timestep, 1e-3):
                if not self._relative:
                    return nearest, len(distinct)
                if self._offset is None:
                    self._offset = nearest
                return nearest - self._offset, len(distinct) - self._offset
        for index, value in enumerate(self._seen):
            if _close(value, timestep, 1e-6):
                return index, None
        self._seen.append(timestep)
        return len(self._seen) - 1, None

    def ends_step(self, timestep: float, scheduler) -> bool:
        """After ``scheduler.step`` at ``timestep``: is that step now complete?

        Second-order schedulers (Heun, KDPM2) visit a noise level twice; the
        step ends with the last visit. Schedulers that track ``step_index``
        say where they go next; the others never repeat a timestep.
        """
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        if timesteps is None or not len(timesteps):
            return True
        following = getattr(scheduler, "step_index", None)
        if following is None:
            return True
        if following >= len(timesteps):
            return True
        next_step, _ = self.step_at(float(timesteps[following]), scheduler)
        this_step, _ = self.step_at(timestep, scheduler)
        return next_step != this_step


__all__ = ["StepClock"]

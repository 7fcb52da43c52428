"""StepClock with pipelines that pass the denoiser ``timestep / 1000`` (Flux) and with those that do not."""

from __future__ import annotations

from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from xattn.clock import StepClock


def flow(steps: int, begin: int | None = 0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    if begin is not None:
        scheduler.set_begin_index(begin)
    return scheduler


def test_sigmas_count_the_steps_of_the_schedule():
    scheduler = flow(4)
    clock = StepClock()
    clock.new_run()
    sigmas = (scheduler.timesteps / 1000).tolist()
    assert [clock.step_of(s, scheduler) for s in sigmas] == [(i, 4) for i in range(4)]
    assert [clock.step_at(float(t), scheduler) for t in scheduler.timesteps] == [(i, 4) for i in range(4)]


def test_a_sigma_of_one_is_the_first_step_even_when_the_schedule_ends_at_one():
    scheduler = flow(1000)  # timesteps 1000 ... 1.0: the call's sigma 1.0 and the last timestep 1.0 look alike
    assert float(scheduler.timesteps[-1]) == 1.0
    clock = StepClock()
    clock.new_run()
    assert clock.step_of(1.0, scheduler) == (0, 1000)  # the scheduler is at begin_index 0
    assert clock.step_of(float(scheduler.timesteps[500]) / 1000, scheduler) == (500, 1000)
    assert clock.step_at(1.0, scheduler) == (999, 1000)  # a step-end callback's t is in scheduler units


def test_scheduler_units_stay_as_they_were():
    for scheduler in (flow(4, begin=None), flow(1000, begin=0)):
        clock = StepClock()
        clock.new_run()
        assert [clock.step_of(float(t), scheduler)[0] for t in scheduler.timesteps[:3]] == [0, 1, 2]
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    clock = StepClock()
    clock.new_run()
    assert [clock.step_of(float(t), ddim) for t in ddim.timesteps] == [(i, 10) for i in range(10)]


def test_without_a_position_only_the_reading_that_matches_counts():
    scheduler = flow(4, begin=None)  # no begin_index, no step_index: the match decides
    clock = StepClock()
    clock.new_run()
    assert clock.step_of(float(scheduler.timesteps[2]) / 1000, scheduler) == (2, 4)
    clock.new_run(relative=True)
    assert clock.step_of(float(scheduler.timesteps[1]) / 1000, scheduler) == (0, 3)

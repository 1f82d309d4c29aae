"""The step grid of `updated_at` stamps (monitor.schedule.lattice), and how the adaptive policy uses it.

The runs here are the simulator's own (`SimExecution`): its `last_change` is what the server sends
as `updated_at`, its `reported_progress` the noisy reading.
"""

from __future__ import annotations

import math
import random

import pytest

from monitor.schedule.adaptive import AdaptivePolicy, _estimate
from monitor.schedule.lattice import STAMP_TOL_S, WHOLE_SECOND_S, step_bounds, step_time
from monitor.schedule.state import ExecState
from monitor.simulator.progress import SimExecution
from monitor.simulator.scenario import PlannedOutcome, ProgressModel


def _ms(t: float) -> float:
    """A stamp as the API sends it: milliseconds."""
    return round(t, 3)


def _run(model: str, run_s: float, *, seed: int = 1, noise: float = 1.5, shape: float = 1.0) -> SimExecution:
    return SimExecution.create(
        execution_id="exec_grid",
        created_at=1000.0,
        duration_s=run_s,
        end_s=run_s,
        outcome=PlannedOutcome.COMPLETED,
        progress=ProgressModel(model, noise, shape),
        seed=seed,
    )


def _stamps(run: SimExecution, polls: list[float]) -> list[float]:
    return [_ms(run.last_change(1000.0 + t)) for t in polls]


def test_a_linear_runs_stamps_give_its_step_to_the_millisecond() -> None:
    rng = random.Random(7)
    for _ in range(50):
        run_s = rng.uniform(300.0, 7200.0)
        run = _run("linear", run_s, seed=rng.randrange(1000))
        polls = sorted(rng.uniform(0.05, 0.97) * run_s for _ in range(4))
        tau = step_time(_stamps(run, polls), run_s / 100.0 * rng.uniform(0.96, 1.04), 0.02)
        if tau is not None:  # two polls within one step give one stamp: then there may be too few
            assert tau == pytest.approx(run_s / 100.0, abs=1e-3)  # 1 ms per stamp, over 10+ steps


def test_the_grid_does_not_depend_on_how_the_server_rounds_progress() -> None:
    """Changes at whole steps (floor) instead of half steps (round): only differences count."""
    tau = 23.456
    stamps = [_ms(500.0 + level * tau) for level in (4, 17, 31, 58)]
    assert step_time(stamps, tau * 1.03, 0.02) == pytest.approx(tau, abs=1e-4)


def test_one_stamp_off_the_grid_is_left_out() -> None:
    """A change of current_step between two progress steps moves updated_at off the grid."""
    run_s = 3000.0
    run = _run("linear", run_s)
    stamps = [*_stamps(run, [200.0, 700.0, 1400.0, 2300.0]), _ms(1000.0 + 0.3 * run_s + 7.0)]
    assert step_time(stamps, 30.5, 0.02) == pytest.approx(30.0, abs=2e-4)


def test_no_grid_from_curves_and_none_far_off_from_checkpoints_or_whole_seconds() -> None:
    """A curve's stamps have no grid. Checkpoints at whole per cents of the run, and stamps rounded to
    whole seconds, may have one by chance: then it is about the run's own step (the end within a
    few per cent), never far off."""
    rng = random.Random(11)
    found = []
    for i in range(100):
        run_s = rng.uniform(600.0, 7200.0)
        polls = sorted(rng.uniform(0.05, 0.97) * run_s for _ in range(6))
        curve = _run("curve", run_s, seed=i, noise=1.0, shape=0.6)
        assert step_time(_stamps(curve, polls), run_s / 100.0, 0.05) is None
        steps = _run("steps", run_s, seed=i, noise=3.0)
        whole_seconds = [float(round(t)) for t in _stamps(_run("linear", run_s, seed=i), polls)]
        for stamps in (_stamps(steps, polls), whole_seconds):
            tau = step_time(stamps, run_s / 100.0, 0.05)
            if tau is not None:
                found.append(tau / (run_s / 100.0))
    assert len(found) < 20
    assert all(abs(ratio - 1.0) < 0.03 for ratio in found)


def test_too_few_stamps_or_too_vague_a_guess_give_no_grid() -> None:
    assert step_time([10.0, 40.0], 10.0, 0.01) is None  # a pair proposes, nothing confirms
    assert step_time([10.0, 40.0, 40.0], 10.0, 0.01) is None  # the same stamp twice is one
    assert step_time([10.0, 40.0, 70.0, 130.0], 10.0, 0.5) is None  # tau / 2 would fit too
    assert step_time([10.0, 40.0, 70.0, 130.0], 10.0, 0.01) == pytest.approx(10.0)


def test_whole_second_stamps_give_the_step_to_about_a_second_over_the_steps_between_them() -> None:
    """A server that cuts updated_at to the second: the search with a second's tolerance finds the
    step count, and the bounds hold the true tau in a range of about 2 s / (steps spanned)."""
    rng = random.Random(5)
    found = 0
    for _ in range(100):
        run_s = rng.uniform(1200.0, 7200.0)
        run = _run("linear", run_s, seed=rng.randrange(1000))
        polls = sorted(rng.uniform(0.05, 0.9) * run_s for _ in range(5))
        stamps = [float(math.floor(t)) for t in _stamps(run, polls)]
        guess = run_s / 100.0 * rng.uniform(0.97, 1.03)
        tau = step_time(stamps, guess, 0.02, WHOLE_SECOND_S)
        if tau is None:
            continue
        found += 1
        low, high = step_bounds(stamps, tau, WHOLE_SECOND_S)
        spanned = round((max(stamps) - min(stamps)) / tau)
        assert low - 1e-9 <= run_s / 100.0 <= high + 1e-9
        assert high - low <= 4.0 / spanned  # 2 s over the steps spanned, a few less if an end is off the grid
    assert found >= 80  # the rest: two polls within one step, or an ambiguous step count


def test_whole_second_stamps_with_short_steps_give_no_grid() -> None:
    """Steps of 3 s against a tolerance of 1 s: many grids would fit by chance."""
    stamps = [float(math.floor(100.0 + k * 3.0)) for k in (0, 7, 19, 30)]
    assert step_time(stamps, 3.0, 0.02, WHOLE_SECOND_S) is None


def _answer(
    policy: AdaptivePolicy, state: ExecState, run: SimExecution, at: float, *, whole_seconds: bool = False
) -> None:
    """What the scheduler does with a running answer at loop time `at`: a sample stamped with
    updated_at (in milliseconds, or cut to the second), then the policy's update."""
    state.ver += 1  # taken out of the queue, as `choose` does
    state.polls += 1
    state.last_poll = at
    state.progress = run.reported_progress(at)
    stamp = math.floor(run.last_change(at)) if whole_seconds else _ms(run.last_change(at))
    state.stamp_tol = WHOLE_SECOND_S if whole_seconds else STAMP_TOL_S
    state.add_sample(min(stamp, at), state.progress)
    policy.polled(state, at)


def _tracked(policy: AdaptivePolicy, run: SimExecution, tracked_at: float) -> ExecState:
    state = ExecState(run.execution_id, tracked_at)
    policy.add(state, tracked_at)
    return state


def test_a_run_tracked_from_its_start_is_polled_right_after_its_end() -> None:
    """Three answers at 15-45 % of a 2,400 s run: the noisy readings alone put its end tens of
    seconds either way; the stamps put it within a second, and its poll comes just after it."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    for i in range(300):  # a round robin of 600 s: theta is 18 s, and a sharp end is polled before that
        policy.add(ExecState(f"exec_{i}", 1000.0), 1000.0)
    policy.floor_interval(1000.0)
    run = _run("linear", 2400.0, seed=3)
    state = _tracked(policy, run, 1000.0)
    for f in (0.15, 0.31, 0.45):
        _answer(policy, state, run, 1000.0 + f * 2400.0 + 0.4)
    assert state.eta == pytest.approx(run.end_at, abs=1.0)
    assert state.due == pytest.approx(run.end_at, abs=5.0)


@pytest.mark.parametrize("tracked_late", [False, True])
def test_whole_second_stamps_put_the_end_within_seconds(tracked_late: bool) -> None:
    """Stamps cut to the second, five answers over the first half of a run of about 3,000 s: the end within
    a few seconds from its start (or the readings', handed over at 20 %), the sd saying how sure."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    errors, sds = [], []
    for seed in range(20):
        run_s = 2900.0 + 13.37 * seed  # steps of 29-31.5 s: the changes fall anywhere in a second
        run = _run("linear", run_s, seed=seed)
        state = _tracked(policy, run, 1000.0 + (0.2 * run_s if tracked_late else 0.0))
        for f in (0.22, 0.3, 0.37, 0.45, 0.52):
            _answer(policy, state, run, 1000.0 + f * run_s + 0.6, whole_seconds=True)
        errors.append(state.eta - run.end_at)
        eta = _estimate(state)
        assert eta is not None
        sds.append(eta.sd)
    median_error = sorted(abs(e) for e in errors)[len(errors) // 2]
    if tracked_late:  # the readings' noise: within two steps of 30 s, as with milliseconds
        assert median_error < 60.0
    else:
        assert median_error < 4.0
        assert max(abs(e) for e in errors) < 12.0
        assert all(sd < 6.0 for sd in sds)


def test_a_run_handed_over_late_gets_the_steps_slope_and_the_readings_height() -> None:
    """Handed over at 40 % of its run: no anchor, but the grid fixes the slope, so the end is off by
    the readings' noise only (a few steps), not by the slope's error times the time left."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    errors = []
    for seed in range(20):
        run = _run("linear", 3000.0, seed=seed)
        state = _tracked(policy, run, 1000.0 + 0.4 * 3000.0)
        for f in (0.41, 0.5, 0.58, 0.66, 0.72):
            _answer(policy, state, run, 1000.0 + f * 3000.0 + 0.7)
        errors.append(abs(state.eta - run.end_at))
    assert sorted(errors)[len(errors) // 2] < 2.0 * 30.0  # the median within two steps
    assert max(errors) < 6.0 * 30.0


def test_checkpoint_progress_is_not_sharpened() -> None:
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    run = _run("steps", 3000.0, seed=5, noise=3.0)
    state = _tracked(policy, run, 1000.0)
    for f in (0.12, 0.25, 0.41, 0.55, 0.63, 0.77):
        _answer(policy, state, run, 1000.0 + f * 3000.0 + 0.3)
    eta = _estimate(state)
    assert eta is not None
    assert eta.sd > 5.0  # the line's own uncertainty, not the grid's second


def test_a_run_that_stood_still_for_longer_than_its_steps_is_not_sharpened() -> None:
    """Stamps on a grid, then the same updated_at for 10 steps: not a steady pace any more."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    state = ExecState("exec_still", 0.0)
    policy.add(state, 0.0)
    for level in (10, 23, 37, 50):  # its level changes at (level - 0.5) steps of 30 s
        state.ver += 1
        state.last_poll = (level - 0.5) * 30.0 + 11.0
        state.add_sample((level - 0.5) * 30.0, level)
        policy.polled(state, state.last_poll)
    sharp = _estimate(state)
    assert sharp is not None
    assert sharp.at == pytest.approx(3000.0, abs=0.01)
    assert sharp.sd <= 1.0
    state.ver += 1
    state.last_poll = 49.5 * 30.0 + 300.0
    state.add_sample(49.5 * 30.0, 50)  # still the old stamp, 10 steps later
    policy.polled(state, state.last_poll)
    vague = _estimate(state)
    assert vague is not None
    assert vague.sd > 5.0


def test_a_zero_reading_of_a_started_run_does_not_move_its_start() -> None:
    """Noise of a few per cent read as 0 % early in the run: its updated_at has moved since the
    handover, so the run has started; that poll is no lower bound of the start (it was, and made
    the end late by the time of that poll)."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    run = _run("linear", 3000.0, seed=2)
    state = _tracked(policy, run, 1000.0)
    state.ver += 1
    state.last_poll = 1000.0 + 75.0  # 2.5 % in: level 2 since 45 s
    state.progress = 0
    state.add_sample(_ms(run.last_change(state.last_poll)), 0)
    policy.polled(state, state.last_poll)
    assert state.zero_at == -math.inf
    for f in (0.2, 0.37, 0.52):
        _answer(policy, state, run, 1000.0 + f * 3000.0 + 0.5)
    assert state.eta == pytest.approx(run.end_at, abs=1.0)


def test_a_queued_steady_run_starts_where_its_readings_say() -> None:
    """600 s in a queue at 0 % (updated_at: its creation), then a steady 2,137 s run. The last poll
    at 0 % came 400 s before the start: ending from there would be 400 s early; the readings on
    the grid put the start within a few steps."""
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.5)
    run = SimExecution.create(
        execution_id="exec_queued",
        created_at=1000.0,
        duration_s=2137.3,
        end_s=2737.3,
        outcome=PlannedOutcome.COMPLETED,
        progress=ProgressModel("linear", 1.5),
        seed=4,
        queue_s=600.0,
    )
    state = _tracked(policy, run, 1000.0)
    _answer(policy, state, run, 1200.0)
    assert state.zero_at == 1200.0  # still queued: nothing moved since the handover
    for f in (0.2, 0.33, 0.45, 0.6):
        _answer(policy, state, run, 1600.0 + f * 2137.3 + 0.5)
    assert run.end_at - 4 * 21.4 < state.eta < run.end_at + 21.4

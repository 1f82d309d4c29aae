"""Every documented [polling] setting changes what the scheduler or its policy does.

The interval settings (initial_interval_s, backoff_factor, max_interval_s) at policy level, through
`make_policy` as the engine calls it; the others at scheduler level on virtual time.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import pytest
from test_scheduler import FakeSource, MaxRandom, Recorder, completed, running, scenario, until_idle

from monitor.api.errors import ExecutionNotFound, TransientError, TransientReason
from monitor.config import PollingConfig
from monitor.records import Outcome
from monitor.schedule.adaptive import AdaptivePolicy
from monitor.schedule.budget import Budget
from monitor.schedule.policy import Policy, make_policy
from monitor.schedule.scheduler import Scheduler
from monitor.schedule.state import ExecState

# -- helpers ----------------------------------------------------------------------------------------


def answer_running(policy: Policy, state: ExecState, now: float, progress: int | None = None) -> None:
    """What the scheduler does with a "running" answer (the state was taken out of the queue)."""
    state.ver += 1
    state.polls += 1
    state.last_poll = now
    if progress is not None:
        state.add_sample(now, progress)
    policy.polled(state, now)


def poll_times(policy: Policy, polls: int, rate_per_s: float = 100.0) -> list[float]:
    """When one running execution, tracked at 0, is polled with tokens to spare."""
    policy.bind_rate(lambda: rate_per_s)
    state = ExecState("exec_a", 0.0)
    policy.add(state, 0.0)
    now = 0.0
    times: list[float] = []
    while len(times) < polls:
        now = max(now, policy.ready_at(now))
        chosen = policy.choose(now)
        assert chosen is state
        times.append(now)
        answer_running(policy, state, now)
    return times


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def miss_gaps(policy: Policy, misses: int) -> list[float]:
    """The adaptive policy's wait after each poll at a predicted end that finds the run stuck at 98 %."""
    policy.bind_rate(lambda: 0.5)
    state = ExecState("exec_a", 0.0)
    policy.add(state, 0.0)
    for t in (100.0, 200.0, 300.0):  # on course for 100 % at 400 s
        answer_running(policy, state, t, round(100 * t / 400))
    waits, now = [], state.due
    for _ in range(misses):
        answer_running(policy, state, now, 98)
        waits.append(state.due - now)
        now = state.due
    return waits


# -- the defaults -----------------------------------------------------------------------------------


def test_make_policy_defaults_are_the_configs() -> None:
    defaults = PollingConfig()
    parameters = inspect.signature(make_policy).parameters
    for key in ("initial_interval_s", "backoff_factor", "max_interval_s"):
        assert parameters[key].default == getattr(defaults, key)


def test_default_settings_keep_the_adaptive_policys_own_constants() -> None:
    policy = make_policy("adaptive")
    assert isinstance(policy, AdaptivePolicy)
    assert (policy.min_gap_s, policy.retry_growth) == (2.0, 1.5)


@pytest.mark.parametrize(
    "settings",
    [
        {"initial_interval_s": 0.0},
        {"initial_interval_s": 10.0, "max_interval_s": 5.0},
        {"backoff_factor": 0.5},
    ],
)
def test_make_policy_refuses_intervals_that_make_no_sense(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="initial_interval_s"):
        make_policy("backoff", **settings)


# -- initial_interval_s, backoff_factor, max_interval_s: backoff ------------------------------------


def test_backoff_initial_interval_is_the_first_gap() -> None:
    assert gaps(poll_times(make_policy("backoff"), 3)) == pytest.approx([1.0, 1.5])
    assert gaps(poll_times(make_policy("backoff", initial_interval_s=4.0), 3)) == pytest.approx([4.0, 6.0])


def test_backoff_factor_is_the_growth_of_the_gaps() -> None:
    assert gaps(poll_times(make_policy("backoff", backoff_factor=2.0), 5)) == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert gaps(poll_times(make_policy("backoff", backoff_factor=1.0), 5)) == pytest.approx([1.0] * 4)


def test_backoff_max_interval_caps_the_gaps() -> None:
    assert max(gaps(poll_times(make_policy("backoff"), 14))) == pytest.approx(30.0)
    assert gaps(poll_times(make_policy("backoff", max_interval_s=3.0), 6)) == pytest.approx([1.0, 1.5, 2.25, 3.0, 3.0])


def test_backoff_restored_delay_is_capped_by_this_processs_max_interval() -> None:
    policy = make_policy("backoff", max_interval_s=5.0)
    state = ExecState("exec_a", 0.0)
    state.polls, state.last_poll, state.delay = 20, 100.0, 30.0  # saved by a process with a 30 s cap
    policy.add(state, 110.0)
    assert policy.ready_at(110.0) == pytest.approx(105.0)


# -- initial_interval_s, backoff_factor, max_interval_s: adaptive -----------------------------------


def test_adaptive_initial_interval_above_two_seconds_spaces_every_poll() -> None:
    assert gaps(poll_times(make_policy("adaptive"), 4)) == pytest.approx([2.0] * 3)
    times = poll_times(make_policy("adaptive", initial_interval_s=5.0), 4)
    assert times[0] == pytest.approx(5.0)  # not sooner after tracking either
    assert gaps(times) == pytest.approx([5.0] * 3)


def test_adaptive_initial_interval_scales_the_waits_after_misses() -> None:
    # The first wait is the predicted end's own; from the second miss on, g * 1.5**misses.
    assert miss_gaps(make_policy("adaptive"), 3)[1:] == pytest.approx([2.0 * 1.5**2, 2.0 * 1.5**3])
    slower = make_policy("adaptive", initial_interval_s=4.0)
    assert miss_gaps(slower, 3)[1:] == pytest.approx([4.0 * 1.5**2, 4.0 * 1.5**3])


def test_adaptive_backoff_factor_is_the_growth_of_the_waits_after_misses() -> None:
    assert miss_gaps(make_policy("adaptive", backoff_factor=3.0), 4)[1:] == pytest.approx([18.0, 54.0, 162.0])
    assert miss_gaps(make_policy("adaptive", backoff_factor=1.0), 6)[-2:] == pytest.approx([2.0, 2.0])


def test_adaptive_max_interval_bounds_the_floor_as_far_as_the_budget_allows() -> None:
    policy = make_policy("adaptive", initial_interval_s=0.5, max_interval_s=1.0)
    assert gaps(poll_times(policy, 4)) == pytest.approx([1.0] * 3)  # default: every 2 s (above)
    assert isinstance(policy, AdaptivePolicy)
    assert policy.floor_interval(10.0) == pytest.approx(1.0)
    crowded = AdaptivePolicy(max_interval_s=1.0, initial_interval_s=0.5)
    crowded.bind_rate(lambda: 0.5)
    for i in range(100):
        crowded.add(ExecState(f"exec_{i:03d}", 0.0), 0.0)
    assert crowded.floor_interval(0.0) == pytest.approx(1.1 * 100 / 0.5)  # what 0.5 requests/s allow


# -- scheduler-level settings -----------------------------------------------------------------------


def most_at_once(source: FakeSource) -> int:
    """The largest number of requests that were out at the same moment."""
    edges = sorted([(start, 1) for _, start, _ in source.calls] + [(end, -1) for _, _, end in source.calls])
    return max(itertools.accumulate(step for _, step in edges))


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_max_in_flight_caps_concurrent_requests(max_in_flight: int) -> None:
    source = FakeSource(lambda _, n: completed() if n >= 3 else running(), latency=5.0)

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        for i in range(10):
            scheduler.track(f"exec_{i}")
        await until_idle(scheduler)

    scenario(source, body, max_in_flight=max_in_flight)
    assert most_at_once(source) == max_in_flight


@pytest.mark.parametrize(
    ("base_s", "cap_s", "ceilings"),
    [(1.0, 30.0, [1.0, 2.0, 4.0, 8.0, 16.0]), (3.0, 10.0, [3.0, 6.0, 10.0, 10.0, 10.0])],
)
def test_error_backoff_base_and_cap_shape_the_retry_waits(base_s: float, cap_s: float, ceilings: list[float]) -> None:
    error = TransientError(TransientReason.SERVER_ERROR, "server answered HTTP 503")
    source = FakeSource(lambda _, n: error if n <= 5 else completed())
    rng = MaxRandom()

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one")
        await until_idle(scheduler)

    scenario(source, body, rng=rng, error_backoff_base_s=base_s, error_backoff_cap_s=cap_s)
    starts = [started for _, started, _ in source.calls]
    assert gaps(starts) == pytest.approx(ceilings, abs=0.05)


def not_found_run(**settings: Any) -> tuple[int, float]:
    """Requests made and seconds from the first 404 to the `not_found` outcome."""
    source = FakeSource(lambda eid, _: ExecutionNotFound(eid))

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_gone")
        await until_idle(scheduler)

    recorder, _ = scenario(source, body, **settings)
    [(event, at)] = recorder.events
    assert event.outcome is Outcome.NOT_FOUND
    return len(source.calls), at - source.calls[0][2]


def test_not_found_confirmations_is_the_number_of_404s_needed() -> None:
    assert not_found_run(not_found_confirmations=1, not_found_min_span_s=0.0)[0] == 1
    assert not_found_run(not_found_confirmations=5, not_found_min_span_s=0.0)[0] == 5


def test_not_found_min_span_is_the_time_the_404s_must_cover() -> None:
    for span_s in (5.0, 60.0):
        calls, took = not_found_run(not_found_confirmations=3, not_found_min_span_s=span_s)
        assert calls == 3
        assert took == pytest.approx(span_s, abs=0.05)


def test_every_polling_key_has_a_taker_of_the_same_name() -> None:
    """A [polling] key that neither Scheduler nor make_policy takes would be parsed and ignored."""
    takers = set(inspect.signature(Scheduler).parameters) | set(inspect.signature(make_policy).parameters)
    takers |= {"policy", "deadline_s"}  # make_policy's first argument; Scheduler.track's
    assert set(PollingConfig.__dataclass_fields__) <= takers

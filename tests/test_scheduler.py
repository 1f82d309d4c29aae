"""The scheduler on virtual time: a fake status source at unit level, the real simulator for the budget."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from monitor import vtime
from monitor.api.client import ExecutionsClient
from monitor.api.errors import ExecutionNotFound, KeyRejected, Throttled, TransientError, TransientReason
from monitor.api.models import StatusRecord, parse_status
from monitor.clock import Clock
from monitor.errors import StoreFault
from monitor.ids import InvalidExecutionId
from monitor.rates import RateLimit
from monitor.records import Outcome, TerminalEvent
from monitor.schedule.budget import Budget
from monitor.schedule.lattice import STAMP_TOL_S, WHOLE_SECOND_S
from monitor.schedule.policy import make_policy
from monitor.schedule.scheduler import NullListener, Scheduler
from monitor.secrets import Secret
from monitor.simulator.server import SimulatorSettings, simulator_of, start_simulator

FAST = RateLimit(100, 1.0)  # the budget out of the way
Behavior = Callable[[str, int], object]  # (id, call number for that id) -> status dict or exception


def running(progress: int = 10) -> dict[str, Any]:
    return {"status": "running", "progress": progress}


def completed() -> dict[str, Any]:
    return {"status": "completed", "progress": 100, "result": "ok", "completed_at": "2025-01-01T00:00:00Z"}


class FakeSource:
    """Answers from `behavior`, after `latency` virtual seconds; records every call."""

    def __init__(self, behavior: Behavior, latency: float = 0.0) -> None:
        self.behavior = behavior
        self.latency = latency
        self.calls: list[tuple[str, float, float]] = []  # id, started, answered
        self.per_id: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight_per_id = 0

    async def get_status(self, execution_id: str) -> StatusRecord:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.in_flight[execution_id] += 1
        self.max_in_flight_per_id = max(self.max_in_flight_per_id, self.in_flight[execution_id])
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight[execution_id] -= 1
        self.per_id[execution_id] += 1
        self.calls.append((execution_id, started, loop.time()))
        answer = self.behavior(execution_id, self.per_id[execution_id])
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, dict)
        return parse_status(execution_id, {"execution_id": execution_id, **answer})


class Recorder(NullListener):
    def __init__(self) -> None:
        self.events: list[tuple[TerminalEvent, float]] = []
        self.polls: list[tuple[str, str | None, str | None]] = []
        self.rejected = 0
        self.throttled: list[float | None] = []
        self.fail_terminal = 0

    async def on_terminal(self, event: TerminalEvent) -> None:
        if self.fail_terminal:
            self.fail_terminal -= 1
            raise StoreFault("state file x: database or disk is full")
        self.events.append((event, asyncio.get_running_loop().time()))

    def on_poll(self, execution_id: str, status: StatusRecord | None, error: str | None) -> None:
        self.polls.append((execution_id, status.raw_status if status else None, error))

    def on_key_rejected(self, reason: str) -> None:
        self.rejected += 1

    def on_throttled(self, retry_after_s: float | None) -> None:
        self.throttled.append(retry_after_s)


class MaxRandom:
    """A `random.Random` stand-in whose uniform(a, b) returns b, and remembers (a, b)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b


Body = Callable[[Scheduler, Recorder, Budget], Awaitable[None]]


def scenario(
    source: Any,
    body: Body,
    *,
    rate: RateLimit = FAST,
    policy: str = "backoff",
    **kwargs: Any,
) -> tuple[Recorder, Budget]:
    """Run a scheduler over `source` on virtual time while `body` drives it; stop afterwards."""

    async def main() -> tuple[Recorder, Budget]:
        clock = Clock(asyncio.get_running_loop())
        budget = Budget(rate, clock)
        recorder = Recorder()
        scheduler = Scheduler(source, budget, make_policy(policy), clock, listener=recorder, **kwargs)
        task = asyncio.create_task(scheduler.run())
        try:
            await body(scheduler, recorder, budget)
        finally:
            await scheduler.stop(grace_s=1.0)
            await task
        return recorder, budget

    return vtime.run(main())


async def until_idle(scheduler: Scheduler, limit_s: float = 36_000) -> None:
    await asyncio.wait_for(scheduler.wait_idle(), limit_s)


# -- outcomes --------------------------------------------------------------------------------------


def test_terminal_status_becomes_an_event_and_the_id_is_forgotten() -> None:
    source = FakeSource(lambda _, n: completed() if n >= 4 else running(n * 20))

    async def body(scheduler: Scheduler, recorder: Recorder, _: Budget) -> None:
        assert scheduler.track("exec_one", group="g1", labels={"team": "a"})
        await until_idle(scheduler)
        assert scheduler.tracked_count == 0
        assert scheduler.snapshot("exec_one") is None
        assert scheduler.track("exec_one")  # forgotten: tracking it again is new
        scheduler.untrack("exec_one")

    recorder, _ = scenario(source, body)
    [(event, _)] = recorder.events
    assert event.outcome is Outcome.COMPLETED
    assert event.polls == 4
    assert (event.group, event.labels) == ("g1", {"team": "a"})
    assert event.status is not None
    assert event.status.result == "ok"
    assert [status for _, status, _ in recorder.polls] == ["running"] * 3 + ["completed"]


def test_stamps_in_whole_seconds_are_noticed_per_execution() -> None:
    """A run whose updated_at never has a fraction gets a second's tolerance on its grid; one
    fractional stamp says milliseconds for good (a whole one among them is chance)."""
    stamps = {
        "exec_whole": ["2025-01-01T00:00:05Z", "2025-01-01T00:00:17Z"],
        "exec_ms": ["2025-01-01T00:00:05Z", "2025-01-01T00:00:17.250Z", "2025-01-01T00:00:31Z"],
    }

    def answer(execution_id: str, n: int) -> dict[str, Any]:
        return {**running(10 * n), "updated_at": stamps[execution_id][min(n, len(stamps[execution_id])) - 1]}

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        for execution_id in stamps:
            scheduler.track(execution_id)
        await asyncio.sleep(600)
        tolerances = {i: scheduler._states[i].stamp_tol for i in stamps}
        assert tolerances == {"exec_whole": WHOLE_SECOND_S, "exec_ms": STAMP_TOL_S}
        assert all(scheduler._states[i].polls >= 3 for i in stamps)

    scenario(FakeSource(answer), body, policy="adaptive")


def test_invalid_ids_are_refused_before_any_request() -> None:
    source = FakeSource(lambda _, __: completed())

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        with pytest.raises(InvalidExecutionId):
            scheduler.track("../admin")

    scenario(source, body)
    assert source.calls == []


def test_retracking_is_a_no_op_that_keeps_the_due_time() -> None:
    source = FakeSource(lambda _, __: running())

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        assert scheduler.track("exec_one")
        await asyncio.sleep(20)
        before = scheduler.snapshot("exec_one")
        assert not scheduler.track("exec_one", deadline_s=5)
        assert scheduler.snapshot("exec_one") == before
        assert scheduler.tracked_count == 1

    scenario(source, body)


def test_transient_errors_retry_with_full_jitter_bounds() -> None:
    error = TransientError(TransientReason.SERVER_ERROR, "server answered HTTP 503")
    source = FakeSource(lambda _, n: error if n <= 7 else completed())
    rng = MaxRandom()

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one")
        await until_idle(scheduler)

    recorder, _ = scenario(source, body, rng=rng, error_backoff_base_s=1.0, error_backoff_cap_s=30.0)
    assert [a for a, _ in rng.calls] == [0.0] * 7  # uniform(0, ...): full jitter
    assert [b for _, b in rng.calls] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    starts = [started for _, started, _ in source.calls]
    answers = [answered for _, _, answered in source.calls]
    for i, (_, bound) in enumerate(rng.calls):
        assert starts[i + 1] - answers[i] == pytest.approx(bound, abs=0.05)  # waited exactly the draw
    assert recorder.events[0][0].outcome is Outcome.COMPLETED
    assert sum(1 for _, _, err in recorder.polls if err) == 7


def test_not_found_needs_three_answers_over_five_seconds() -> None:
    source = FakeSource(lambda execution_id, _: ExecutionNotFound(execution_id))

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_typo")
        await until_idle(scheduler)

    recorder, _ = scenario(source, body)
    [(event, _)] = recorder.events
    assert event.outcome is Outcome.NOT_FOUND
    assert event.polls == 3
    answered = [t for _, _, t in source.calls]
    assert answered[-1] - answered[0] >= 5.0
    assert answered[1] - answered[0] == pytest.approx(2.5, abs=0.05)


def test_a_new_execution_that_shows_up_late_is_not_reported_missing() -> None:
    source = FakeSource(
        lambda execution_id, n: ExecutionNotFound(execution_id) if n <= 2 else (completed() if n >= 4 else running())
    )

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_new")
        await until_idle(scheduler)

    recorder, _ = scenario(source, body)
    assert recorder.events[0][0].outcome is Outcome.COMPLETED


def test_deadline_gives_timed_out() -> None:
    source = FakeSource(lambda _, __: running())

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_slow", deadline_s=100)
        scheduler.track("exec_other")
        await asyncio.sleep(300)
        scheduler.untrack("exec_other")

    recorder, _ = scenario(source, body)
    [(event, _at)] = recorder.events
    assert event.outcome is Outcome.TIMED_OUT
    assert event.observed_at - event.tracked_since == pytest.approx(100, abs=1.0)
    assert event.polls > 3


def test_deadline_fires_while_waiting_out_an_error_backoff() -> None:
    error = TransientError(TransientReason.TIMEOUT, "no answer")
    source = FakeSource(lambda _, __: error)

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one", deadline_s=40)
        await until_idle(scheduler)

    recorder, _ = scenario(source, body, error_backoff_base_s=30.0, error_backoff_cap_s=300.0)
    [(event, _)] = recorder.events
    assert event.outcome is Outcome.TIMED_OUT
    assert event.observed_at - event.tracked_since == pytest.approx(40, abs=1.0)


def test_a_401_stops_every_poll_at_once_until_resume() -> None:
    source = FakeSource(lambda _, __: KeyRejected(), latency=1.0)
    good = FakeSource(lambda _, __: completed())
    ids = [f"exec_{i:03d}" for i in range(30)]

    async def body(scheduler: Scheduler, recorder: Recorder, budget: Budget) -> None:
        for execution_id in ids:
            scheduler.track(execution_id)
        await asyncio.sleep(120)
        assert scheduler.key_rejected
        assert budget.blocked
        assert scheduler.tracked_count == 30
        scheduler.resume(good)
        await until_idle(scheduler)

    recorder, _ = scenario(source, body, max_in_flight=4)
    first_401 = min(answered for _, _, answered in source.calls)
    assert all(started <= first_401 for _, started, _ in source.calls)  # nothing sent after it
    assert len(source.calls) <= 4  # only those already in flight
    assert recorder.rejected == 1
    assert sorted(e.execution_id for e, _ in recorder.events) == ids


def test_a_429_pauses_the_whole_key() -> None:
    calls = iter(range(1_000_000))
    source = FakeSource(lambda _, __: Throttled(20.0) if next(calls) == 4 else running())

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_a")
        scheduler.track("exec_b")
        await asyncio.sleep(200)
        scheduler.untrack("exec_a")
        scheduler.untrack("exec_b")

    recorder, budget = scenario(source, body, rate=RateLimit(30, 60.0))
    assert recorder.throttled == [20.0]
    throttled_at = source.calls[4][2]
    later = [started for _, started, _ in source.calls[5:]]
    assert later
    assert min(later) >= throttled_at + 20.0  # no request for either ID during the pause
    assert budget.throttles == 1


@pytest.mark.parametrize("policy", ["backoff", "adaptive"])
def test_one_poll_in_flight_per_id(policy: str) -> None:
    source = FakeSource(lambda _, n: running(min(5 * n, 95)), latency=10.0)

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one")
        scheduler.track("exec_two")
        await asyncio.sleep(200)
        scheduler.untrack("exec_one")
        scheduler.untrack("exec_two")

    scenario(source, body, max_in_flight=8, policy=policy)
    assert source.max_in_flight_per_id == 1
    assert len(source.calls) >= 15  # slots to spare, yet never two at once for one ID


def test_nothing_tracked_means_no_requests_and_no_spinning() -> None:
    source = FakeSource(lambda _, __: running())
    loops: list[int] = []

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, vtime.VirtualTimeLoop)
        before = loop.jumps
        await asyncio.sleep(10_000)
        loops.append(loop.jumps - before)

    _, budget = scenario(source, body)
    assert source.calls == []
    assert budget.requests == 0
    assert loops[0] <= 3  # the sleep itself, not a polling loop


def test_untracked_while_in_flight_gives_no_event() -> None:
    source = FakeSource(lambda _, __: completed(), latency=5.0)

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one")
        await asyncio.sleep(1.0)
        assert scheduler.untrack("exec_one")
        assert not scheduler.untrack("exec_one")
        await asyncio.sleep(10)
        await until_idle(scheduler)

    recorder, _ = scenario(source, body)
    assert recorder.events == []


def test_a_store_fault_on_a_result_gets_the_result_again_later() -> None:
    source = FakeSource(lambda _, __: completed())

    async def body(scheduler: Scheduler, recorder: Recorder, __: Budget) -> None:
        recorder.fail_terminal = 2
        scheduler.track("exec_one")
        await until_idle(scheduler)

    recorder, _ = scenario(source, body)
    assert len(recorder.events) == 1
    assert len(source.calls) == 3


def test_a_broken_source_is_retried_not_fatal() -> None:
    source = FakeSource(lambda _, n: RuntimeError("bug") if n == 1 else completed())

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one")
        await until_idle(scheduler)

    recorder, _ = scenario(source, body)
    assert recorder.events[0][0].outcome is Outcome.COMPLETED


def test_stop_lets_in_flight_polls_finish_within_grace_then_cancels() -> None:
    source = FakeSource(lambda _, __: running(), latency=100.0)

    async def main() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        clock = Clock(loop)
        budget = Budget(FAST, clock)
        scheduler = Scheduler(source, budget, make_policy("backoff"), clock)
        task = asyncio.create_task(scheduler.run())
        scheduler.track("exec_one")
        await asyncio.sleep(1)
        start = loop.time()
        await scheduler.stop(grace_s=5.0)
        await task
        return loop.time() - start, budget.stats().in_flight

    took, in_flight = vtime.run(main())
    assert took == pytest.approx(5.0, abs=0.1)
    assert in_flight == 0


def test_export_and_restore_carry_the_schedule_over() -> None:
    source = FakeSource(lambda _, n: running(min(max(n - 1, 0) * 10, 90)))  # 0 % at first (a queue)
    exported: list[dict[str, Any]] = []

    async def body(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one", deadline_s=10_000)
        await asyncio.sleep(60)
        state = scheduler.export_state("exec_one")
        assert state is not None
        exported.append(state)

    scenario(source, body, policy="adaptive")
    state = exported[0]
    assert state["polls"] >= 3
    assert len(state["samples"]) >= 2
    assert state["deadline_s"] == pytest.approx(10_000)
    assert state["zero_at"] is not None  # the last poll that still saw 0 % bounds the start

    async def again(scheduler: Scheduler, _: Recorder, __: Budget) -> None:
        scheduler.track("exec_one", restored=state)
        copy = scheduler.export_state("exec_one")
        assert copy is not None
        for key in ("polls", "errors", "misses", "progress", "status", "deadline_s"):
            assert copy[key] == state[key]
        for key in ("tracked_since", "last_poll", "zero_at"):
            assert copy[key] == pytest.approx(state[key], abs=1e-3)
        flat = [value for pair in copy["samples"] for value in pair]
        assert flat == pytest.approx([value for pair in state["samples"] for value in pair], abs=1e-3)
        scheduler.untrack("exec_one")

    scenario(FakeSource(lambda _, __: running()), again, policy="adaptive")


# -- with the real client and simulator -------------------------------------------------------------


def test_300_executions_for_20_minutes_with_5xx_stay_within_the_budget() -> None:
    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        limit = RateLimit(30, 60.0)
        runner, url = await start_simulator(
            SimulatorSettings(api_keys=["sk_test_sched"], rate_limit=limit, error_rate=0.1), "127.0.0.1", 0
        )
        simulator = simulator_of(runner)
        ids = simulator.create(count=300, duration_s=3600)
        clock = Clock(loop)
        try:
            async with ExecutionsClient(url, Secret("sk_test_sched")) as client:
                scheduler = Scheduler(client, Budget(limit, clock), make_policy("adaptive"), clock)
                task = asyncio.create_task(scheduler.run())
                for execution_id in ids:
                    scheduler.track(execution_id)
                await asyncio.sleep(20 * 60)
                await scheduler.stop(grace_s=5.0)
                await task
            return simulator.stats()
        finally:
            await runner.cleanup()

    stats = vtime.run(main())
    assert stats["responses"]["5xx"] > 30
    assert stats["responses"]["429"] == 0
    assert stats["max_requests_in_window"] <= 30
    assert stats["requests_total"] >= 20 * 30 - 5  # and the budget was used, not wasted

"""The delivery engine: isolation between sinks, timeouts, backoff, dead letters, restarts, drain."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.clock import Clock
from monitor.config import SinkConfig, SinkEvents
from monitor.delivery import Delivery
from monitor.errors import UsageError
from monitor.metrics import Metrics
from monitor.records import Outcome, TerminalEvent, build_result_record, group_event_id
from monitor.sinks.base import BaseSink, DeliveryError
from monitor.sinks.registry import SinkHandle
from monitor.state.store import DeliveryState, Store, TrackRequest

Behaviour = Callable[[dict[str, Any], int], Awaitable[None]]


class MemorySink(BaseSink):
    """Records what it got; `behaviour(record, attempt_no)` decides each attempt."""

    def __init__(self, behaviour: Behaviour | None = None, concurrency: int = 1) -> None:
        self.got: list[dict[str, Any]] = []
        self.attempts: list[tuple[str, float]] = []
        self.behaviour = behaviour
        self.concurrency = concurrency
        self.opened = self.closed = False
        self.changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait (bounded by the test timeout) until `predicate()` holds after an attempt or delivery."""
        while not predicate():
            self.changed.clear()
            await self.changed.wait()

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.closed = True

    async def send(self, record: dict[str, Any]) -> None:
        self.attempts.append((record["event_id"], asyncio.get_running_loop().time()))
        self.changed.set()
        if self.behaviour is not None:
            await self.behaviour(record, len(self.attempts))
        self.got.append(record)
        self.changed.set()


FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.01}


class Recorder:
    """A DeliveryMetrics that keeps what it was told."""

    def __init__(self) -> None:
        self.results: list[tuple[str, str]] = []
        self.depth: list[int] = []
        self.dead: list[int] = []
        self.circuit: list[tuple[str, bool]] = []

    def delivery(self, sink: str, result: str) -> None:
        self.results.append((sink, result))

    def set_outbox_depth(self, n: int) -> None:
        self.depth.append(n)

    def set_dead_letters(self, n: int) -> None:
        self.dead.append(n)

    def set_circuit_open(self, sink: str, is_open: bool) -> None:
        self.circuit.append((sink, is_open))


def handle(name: str, sink: BaseSink, **common: Any) -> SinkHandle:
    sink.name = name
    config = SinkConfig(type="memory", index=1, source="test", **common)
    return SinkHandle(name, sink, config, getattr(sink, "concurrency", 1))  # type: ignore[arg-type]


def event(n: int, outcome: Outcome = Outcome.COMPLETED, group: str | None = None) -> TerminalEvent:
    return TerminalEvent(f"exec_{n:03d}", outcome, observed_at=2.0, tracked_since=1.0, polls=1, group=group)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state.db") as s:
        s.track_many(TrackRequest(f"exec_{n:03d}", tracked_since=1.0) for n in range(50))
        yield s


async def hang(record: dict[str, Any], attempt: int) -> None:
    await asyncio.sleep(3600)


async def test_a_hanging_sink_delays_nobody_and_ends_in_dead_letters(store: Store) -> None:
    stuck, fast = MemorySink(hang, concurrency=10), MemorySink()
    sinks = [
        # pause_after_failures=0: every row's own attempts (the circuit is tested on its own below)
        handle("stuck", stuck, timeout_s=0.25, max_attempts=2, pause_after_failures=0, **FAST),
        handle("fast", fast),
    ]
    async with Delivery(store, sinks, Clock(), rng=random.Random(1)) as delivery:
        for n in range(20):
            delivery.submit(event(n))
        await fast.until(lambda: len(fast.got) == 20)
        assert delivery.counters()["stuck"].failed == 0  # all 20 arrived before the first hang timed out
        assert delivery.depths() == {"stuck": 20, "fast": 0}
        assert await delivery.drain(timeout=30)
        assert delivery.depths() == {"stuck": 0, "fast": 0}
        counters = delivery.counters()
    assert (counters["stuck"].dead, counters["stuck"].failed, counters["fast"].delivered) == (20, 20, 20)
    dead = store.dead_letters()
    assert len(dead) == 20
    assert all(d.sink == "stuck" and d.attempts == 2 for d in dead)
    assert "gave up after 2 attempts; last: no confirmation within 0.25 s" in (dead[0].last_error or "")
    assert stuck.opened
    assert stuck.closed


async def test_backoff_is_exponential_with_full_jitter_and_capped(store: Store) -> None:
    async def always_fail(record: dict[str, Any], attempt: int) -> None:
        raise DeliveryError("HTTP 503")

    sink = MemorySink(always_fail)
    sinks = [handle("s", sink, max_attempts=6, backoff_base_s=0.02, backoff_cap_s=0.1)]
    async with Delivery(store, sinks, Clock(), rng=random.Random(7)) as delivery:
        delivery.submit(event(1))
        assert await delivery.drain(timeout=10)
    times = [t for _, t in sink.attempts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 6
    ceilings = [min(0.1, 0.02 * 2**n) for n in range(5)]
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        assert gap <= ceiling + 0.05
    [dead] = store.dead_letters()
    assert (dead.attempts, dead.state) == (6, DeliveryState.DEAD)
    assert dead.last_error == "gave up after 6 attempts; last: HTTP 503"


async def test_jitter_spreads_retries_within_the_ceiling(store: Store) -> None:
    clock = Clock()
    delays: list[float] = []

    class Recorder:
        def uniform(self, low: float, high: float) -> float:
            delays.append(high)
            return random.Random(3).uniform(low, high)

    async def fail(record: dict[str, Any], attempt: int) -> None:
        raise DeliveryError("nope", retry_after_s=0.05 if attempt == 3 else None)

    sink = MemorySink(fail)
    sinks = [handle("s", sink, max_attempts=4, backoff_base_s=0.01, backoff_cap_s=0.03)]
    async with Delivery(store, sinks, clock, rng=Recorder()) as delivery:  # type: ignore[arg-type]
        delivery.submit(event(1))
        assert await delivery.drain(timeout=10)
    assert delays == [0.01, 0.02, 0.03]  # min(cap, base * 2**n)
    times = [t for _, t in sink.attempts]
    assert times[3] - times[2] >= 0.029  # Retry-After 0.05 s, capped at backoff_cap_s


async def test_permanent_errors_dead_letter_at_once(store: Store) -> None:
    async def gone(record: dict[str, Any], attempt: int) -> None:
        raise DeliveryError("HTTP 410 from https://h:443 (not retried)", retryable=False)

    sink = MemorySink(gone)
    async with Delivery(store, [handle("h", sink)], Clock()) as delivery:
        delivery.submit(event(1))
        assert await delivery.drain(timeout=5)
    [dead] = store.dead_letters()
    assert (dead.attempts, dead.last_error) == (1, "HTTP 410 from https://h:443 (not retried)")


async def test_a_plugin_bug_is_a_retried_failure_not_a_dead_lane(store: Store) -> None:
    async def buggy(record: dict[str, Any], attempt: int) -> None:
        if attempt == 1:
            raise KeyError("oops")

    sink = MemorySink(buggy)
    async with Delivery(store, [handle("p", sink, backoff_base_s=0.01, backoff_cap_s=0.01)], Clock()) as delivery:
        delivery.submit(event(1))
        delivery.submit(event(2))
        assert await delivery.drain(timeout=5)
    assert sorted(r["execution_id"] for r in sink.got) == ["exec_001", "exec_002"]


async def test_only_confirmed_rows_are_marked_and_the_rest_redelivered_after_restart(store: Store) -> None:
    sink = MemorySink(hang)
    async with Delivery(store, [handle("j", sink, timeout_s=60)], Clock()) as delivery:
        delivery.submit(event(1))
        await sink.until(lambda: bool(sink.attempts))
        # closing mid-attempt (a crash, a shutdown): the row stays pending, no attempt is counted
    row = store.get_delivery(build_result_record(event(1))["event_id"], "j")
    assert row is not None
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)
    again = MemorySink()
    async with Delivery(store, [handle("j", again)], Clock()) as delivery:
        assert await delivery.drain(timeout=5)
    assert [r["execution_id"] for r in again.got] == ["exec_001"]
    assert store.pending_count() == 0


async def test_rows_written_by_another_run_are_loaded_on_start(store: Store) -> None:
    for n in range(5):
        record = build_result_record(event(n))
        store.finish(record["execution_id"], Outcome.COMPLETED, record, ["j", "elsewhere"])
    sink = MemorySink()
    async with Delivery(store, [handle("j", sink)], Clock()) as delivery:
        assert await delivery.drain(timeout=5)  # "elsewhere" is not one of ours: not waited for
    assert len(sink.got) == 5
    assert store.pending_count("elsewhere") == 5


async def test_filters_and_one_group_digest(store: Store) -> None:
    store.track_many(TrackRequest(f"g_{n}", tracked_since=1.0, group="nightly") for n in range(3))
    failures, digests = MemorySink(), MemorySink()
    sinks = [
        handle("failures", failures, on=(Outcome.FAILED, Outcome.CANCELLED)),
        handle("chat", digests, events=(SinkEvents.GROUP,)),
    ]
    async with Delivery(store, sinks, Clock()) as delivery:
        for n, outcome in enumerate([Outcome.COMPLETED, Outcome.FAILED, Outcome.COMPLETED]):
            ev = TerminalEvent(f"g_{n}", outcome, observed_at=2.0, tracked_since=1.0, polls=1, group="nightly")
            delivery.submit(ev)
            delivery.submit(ev)  # a repeat changes nothing
        assert await delivery.drain(timeout=5)
    assert [r["execution_id"] for r in failures.got] == ["g_1"]
    [digest] = digests.got
    assert digest["event_id"] == group_event_id("nightly", digest["batch"])
    assert (digest["total"], digest["outcomes"], digest["failed_ids"]) == (3, {"completed": 2, "failed": 1}, ["g_1"])


async def test_drain_times_out_while_deliveries_can_still_succeed(store: Store) -> None:
    sink = MemorySink(hang)
    async with Delivery(store, [handle("s", sink, timeout_s=5)], Clock()) as delivery:
        delivery.submit(event(1))
        assert await delivery.drain(timeout=0.1) is False
        assert delivery.depths() == {"s": 1}


async def test_the_queue_is_bounded_and_the_backlog_waits_in_the_store(store: Store) -> None:
    gate = asyncio.Event()

    async def slow(record: dict[str, Any], attempt: int) -> None:
        await gate.wait()

    sink = MemorySink(slow)
    async with Delivery(store, [handle("s", sink, queue_size=3)], Clock()) as delivery:
        for n in range(30):
            delivery.submit(event(n))
        await asyncio.sleep(0.05)
        lane = delivery._lanes["s"]
        assert lane.queue.qsize() <= 3
        assert delivery.depths() == {"s": 30}
        gate.set()
        assert await delivery.drain(timeout=5)
    assert [r["execution_id"] for r in sink.got] == [f"exec_{n:03d}" for n in range(30)]


async def test_metrics_hooks_and_retrying_dead_letters(store: Store) -> None:
    async def once_bad(record: dict[str, Any], attempt: int) -> None:
        if attempt == 1:
            raise DeliveryError("bad", retryable=False)

    sink = MemorySink(once_bad)
    metrics = Recorder()
    async with Delivery(store, [handle("m", sink)], Clock(), metrics=metrics) as delivery:
        delivery.submit(event(1))
        assert await delivery.drain(timeout=5)
        assert delivery.retry_dead_letters() == 1
        assert await delivery.drain(timeout=5)
    assert metrics.results == [("m", "dead_letter"), ("m", "ok")]
    assert metrics.dead == [0, 1, 0]  # counted in the store at start and after the retry
    assert metrics.depth[-1] == 0
    assert max(metrics.depth) == 1
    assert metrics.circuit == [("m", False)]


async def test_a_sink_that_cannot_open_is_a_usage_error_and_others_are_closed(store: Store) -> None:
    class Broken(MemorySink):
        async def open(self) -> None:
            raise OSError("no route")

    good = MemorySink()
    delivery = Delivery(store, [handle("good", good), handle("bad", Broken())], Clock())
    with pytest.raises(UsageError, match="sink 'bad' cannot start: OSError: no route"):
        await delivery.start()
    assert good.opened
    assert good.closed


async def test_replacing_sinks_keeps_pending_rows(store: Store) -> None:
    old = MemorySink(hang)
    new = MemorySink()
    async with Delivery(store, [handle("j", old, timeout_s=60)], Clock()) as delivery:
        delivery.submit(event(1))
        await old.until(lambda: bool(old.attempts))
        await delivery.replace_sinks([handle("j", new)])
        assert await delivery.drain(timeout=5)
    assert old.closed
    assert [r["execution_id"] for r in new.got] == ["exec_001"]


class Flaky:
    """A sink behaviour that fails (HTTP 503) while `down`, each attempt taking `busy_s`; it logs
    every attempt's (start, end) to show how many ran at once."""

    def __init__(self, busy_s: float = 0.01) -> None:
        self.down = True
        self.busy_s = busy_s
        self.spans: list[tuple[float, float]] = []

    async def __call__(self, record: dict[str, Any], attempt: int) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(self.busy_s)
        self.spans.append((start, loop.time()))
        if self.down:
            raise DeliveryError("HTTP 503 from h:443")


def overlapping(spans: list[tuple[float, float]]) -> int:
    """How many attempts started before the previous one ended."""
    ordered = sorted(spans)
    return sum(1 for (_, end), (start, _) in itertools.pairwise(ordered) if start < end)


async def test_the_circuit_opens_after_k_failures_probes_one_at_a_time_and_closes(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="monitor")
    flaky = Flaky()
    sink = MemorySink(flaky, concurrency=4)
    metrics = Recorder()
    config = {"pause_after_failures": 3, "backoff_base_s": 0.02, "backoff_cap_s": 0.04}
    async with Delivery(store, [handle("h", sink, **config)], Clock(), metrics=metrics) as delivery:
        for n in range(20):
            delivery.submit(event(n))
        await sink.until(lambda: ("h", True) in metrics.circuit)
        opened_at = asyncio.get_running_loop().time()
        await asyncio.sleep(0.6)
        flaky.down = False
        assert await delivery.drain(timeout=10)
        assert delivery.depths() == {"h": 0}
    while_open = [span for span in flaky.spans if span[0] > opened_at + flaky.busy_s]
    probes = [span for span in while_open if span[0] < opened_at + 0.6]
    assert 3 <= len(probes) <= 40  # one at a time, each after a backoff of at most 0.04 s
    assert overlapping(probes) == 0  # never two at once while open: 4 workers, 20 rows waiting
    assert len(flaky.spans) < 20 + len(probes) + 8  # not every row was tried while the sink was down
    assert sorted(r["execution_id"] for r in sink.got) == [f"exec_{n:03d}" for n in range(20)]
    assert store.dead_count() == 0
    assert metrics.circuit == [("h", False), ("h", True), ("h", False)]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("circuit open" in m for m in messages) == 1
    assert sum("circuit closed" in m for m in messages) == 1


async def test_a_retry_after_pauses_the_whole_sink(store: Store) -> None:
    async def busy_once(record: dict[str, Any], attempt: int) -> None:
        if attempt == 1:
            raise DeliveryError("HTTP 429 from h:443", retry_after_s=0.5)

    sink = MemorySink(busy_once)
    async with Delivery(store, [handle("h", sink, backoff_base_s=0.01, backoff_cap_s=5.0)], Clock()) as delivery:
        for n in range(5):
            delivery.submit(event(n))
        assert await delivery.drain(timeout=10)
    times = [t for _, t in sink.attempts]
    assert len(times) == 6
    assert times[1] - times[0] >= 0.49  # no row at all went to the sink during its Retry-After
    assert len(sink.got) == 5


async def test_a_failing_result_is_dead_only_after_max_age(store: Store) -> None:
    async def down(record: dict[str, Any], attempt: int) -> None:
        raise DeliveryError("connection refused")

    sink = MemorySink(down)
    config = {"max_age": 0.6, "pause_after_failures": 0, "backoff_base_s": 0.02, "backoff_cap_s": 0.05}
    async with Delivery(store, [handle("h", sink, **config)], Clock()) as delivery:
        started = asyncio.get_running_loop().time()
        delivery.submit(event(1))
        await sink.until(lambda: asyncio.get_running_loop().time() - started > 0.4)
        assert store.dead_count() == 0  # many attempts failed, but the horizon is not reached
        assert await delivery.drain(timeout=5)
        ended = asyncio.get_running_loop().time()
    [dead] = store.dead_letters()
    assert ended - started >= 0.6
    assert dead.attempts >= 10
    assert (dead.last_error or "").startswith(f"not delivered within max_age (0.6 s), {dead.attempts} attempts")


async def test_results_waiting_behind_an_open_circuit_are_dead_after_max_age(store: Store) -> None:
    async def down(record: dict[str, Any], attempt: int) -> None:
        raise DeliveryError("connection refused")

    sink = MemorySink(down)
    config = {"max_age": 0.5, "pause_after_failures": 1, "backoff_base_s": 10.0, "backoff_cap_s": 10.0}
    async with Delivery(store, [handle("h", sink, **config)], Clock(), rng=random.Random(4)) as delivery:
        started = asyncio.get_running_loop().time()
        for n in range(5):
            delivery.submit(event(n))
        await asyncio.sleep(0.4)
        assert store.dead_count() == 0
        assert await delivery.drain(timeout=5)
        assert asyncio.get_running_loop().time() - started >= 0.5
    assert len(sink.attempts) < 5  # most were never tried: the sink was paused
    reasons = [d.last_error or "" for d in store.dead_letters()]
    assert len(reasons) == 5
    assert sum("while the sink was failing; last: never attempted" in r for r in reasons) >= 3


async def test_gauges_come_from_the_store_at_start(store: Store) -> None:
    for n in range(3):
        record = build_result_record(event(n))
        store.finish(record["execution_id"], Outcome.COMPLETED, record, ["h"])
        if n < 2:
            store.mark_dead(record["event_id"], "h", "HTTP 410")
    metrics = Metrics()
    async with Delivery(store, [handle("h", MemorySink(hang), timeout_s=60)], Clock(), metrics=metrics):
        text = metrics.render()[0].decode()
    assert "execmon_dead_letters 2.0" in text  # a restart does not reset it
    assert "execmon_outbox_depth 1.0" in text
    assert 'execmon_sink_circuit_open{sink="h"} 0.0' in text

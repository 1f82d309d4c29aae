"""The Python API (`monitor.Monitor`) against the real simulator on loopback, in one event loop.

Executions last 1-3 s, the budget is 30 per 3 s, so every test ends in seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from monitor import ExecmonError, KeyRejectedError, Monitor, MonitorFailed, Outcome, Result
from monitor.engine import NotTrackedError
from monitor.events import Ended, Event, Failed, Polled
from monitor.ids import InvalidExecutionId
from monitor.rates import RateLimit
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator
from monitor.sinks.lane import Lane
from monitor.state.store import Store

KEY = "sk_test_monitor"
RATE = "30/3s"


@pytest.fixture
async def sim() -> AsyncIterator[tuple[Simulator, str]]:
    runner, url = await start_simulator(SimulatorSettings(api_keys=[KEY], rate_limit=RateLimit(30, 3.0)))
    try:
        yield simulator_of(runner), url
    finally:
        await runner.cleanup()


def monitor_for(url: str, **kwargs: object) -> Monitor:
    return Monitor(base_url=url, api_key=KEY, rate_limit=RATE, **kwargs)  # type: ignore[arg-type]


def truth(sim: Simulator) -> dict[str, str]:
    return {t.execution_id: t.status for t in sim.truth()}


async def test_results_yields_each_once_with_the_servers_outcome(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    ids = simulator.create(count=3, duration_s=1.0, outcome="completed")
    ids += simulator.create(count=2, duration_s=1.5, outcome="failed")
    async with monitor_for(url) as mon:
        added = await mon.track(ids)
        assert added.added == ids
        seen = [r async for r in mon.results(ids)]
        assert sorted(r.execution_id for r in seen) == sorted(ids)
        assert all(isinstance(r, Result) and isinstance(r.outcome, Outcome) for r in seen)
        assert {r.execution_id: r.outcome.value for r in seen} == {i: truth(simulator)[i] for i in ids}
        # Everything has ended: wait() and results() answer at once from the state.
        done = await asyncio.wait_for(mon.wait(ids), timeout=1)
        assert set(done) == set(ids)
        again = await asyncio.wait_for(_collect(mon.results(ids)), timeout=1)
        assert sorted(again) == sorted(ids)


async def _collect(stream: AsyncIterator[Result]) -> list[str]:
    return [r.execution_id async for r in stream]


async def test_a_result_is_immutable_aware_and_matches_its_record(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    [execution_id] = simulator.create(count=1, duration_s=1.0, outcome="completed")
    async with monitor_for(url) as mon:
        await mon.track([execution_id])
        result = (await mon.wait([execution_id], timeout=15))[execution_id]
    record = result.record()
    assert record["execution_id"] == execution_id
    assert record["event_id"] == result.event_id
    assert record["outcome"] == "completed" == result.outcome
    assert result.observed_at is not None
    assert result.observed_at.tzinfo is not None
    assert result.finished_at is not None
    assert result.finished_at.tzinfo is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outcome = Outcome.FAILED  # type: ignore[misc]
    record["outcome"] = "changed"
    assert result.record()["outcome"] == "completed"  # record() hands out a copy


async def test_an_invalid_id_raises_value_error_and_tracks_nothing(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=5.0)
    async with monitor_for(url) as mon:
        with pytest.raises(ValueError, match="execution ID") as raised:
            await mon.track([*ids, "../etc/passwd"])
        assert isinstance(raised.value, ExecmonError)
        assert isinstance(raised.value, InvalidExecutionId)
        assert mon.store.tracked_among(ids) == set()
        await asyncio.sleep(0.3)
    assert all(t.polls == 0 for t in simulator.truth())


async def test_wait_times_out_with_timeout_error(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=30.0)
    async with monitor_for(url) as mon:
        await mon.track(ids)
        with pytest.raises(TimeoutError):
            await mon.wait(ids, timeout=0.05)


async def test_waiting_for_an_untracked_id_raises_instead_of_hanging(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=30.0)
    async with monitor_for(url) as mon:
        with pytest.raises(NotTrackedError, match="not tracked"):
            await mon.wait(ids, timeout=5)
        await mon.track(ids)
        waiting = asyncio.create_task(mon.wait(ids, timeout=5))
        await asyncio.sleep(0.1)
        assert mon.untrack(ids[0])
        with pytest.raises(NotTrackedError):
            await waiting


async def test_a_rejected_key_raises_key_rejected_error(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=30.0)
    async with Monitor(base_url=url, api_key="sk_test_wrong", rate_limit=RATE) as mon:
        await mon.track(ids)
        with pytest.raises(KeyRejectedError, match="401"):
            await mon.wait(ids, timeout=10)
        ok, reason = mon.health()
        assert not ok
        assert reason is not None
        assert "401" in reason
    assert issubclass(KeyRejectedError, ExecmonError)


async def test_state_in_a_file_survives_a_new_monitor(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=1.0, outcome="completed")
    state = tmp_path / "state.db"
    async with monitor_for(url, state=state) as first:
        await first.track(ids)
        before = await first.wait(ids, timeout=15)
    polls = sum(t.polls for t in simulator.truth())
    async with monitor_for(url, state=state) as second:
        again = await asyncio.wait_for(second.wait(ids), timeout=1)
        assert (await second.track(ids)).already_tracked == ids  # ended ones are left as they are
    assert {i: r.event_id for i, r in again.items()} == {i: r.event_id for i, r in before.items()}
    assert sum(t.polls for t in simulator.truth()) == polls  # nothing was asked again


async def test_state_none_keeps_nothing_on_disk(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    ids = simulator.create(count=1, duration_s=1.0)
    before = set(Path.cwd().iterdir())
    async with monitor_for(url, state=None) as mon:
        await mon.track(ids)
        await mon.wait(ids, timeout=15)
    assert set(Path.cwd().iterdir()) == before


async def test_subscribers_see_polls_and_ends(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=1.0)
    events: list[Event] = []
    async with monitor_for(url) as mon:
        unsubscribe = mon.subscribe(events.append)
        await mon.track(ids)
        await mon.wait(ids, timeout=15)
        unsubscribe()
    assert {e.result.execution_id for e in events if isinstance(e, Ended)} == set(ids)
    assert any(isinstance(e, Polled) for e in events)


async def test_sinks_given_as_specs_receive_every_result(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    ids = simulator.create(count=3, duration_s=1.0)
    out = tmp_path / "out.jsonl"
    async with monitor_for(url, sinks=[f"jsonl:{out}"]) as mon:
        await mon.track(ids)
        await mon.wait(ids, timeout=15)
        assert await mon.delivery.drain(timeout=5)
    assert len(out.read_text().splitlines()) == 3


async def test_from_config_reads_the_file_and_takes_overrides(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    config = tmp_path / "execmon.toml"
    config.write_text(f'[api]\nbase_url = "{url}"\nrate_limit = "{RATE}"\n[polling]\npolicy = "backoff"\n')
    ids = simulator.create(count=1, duration_s=1.0)
    async with Monitor.from_config(config, api_key=KEY, state=None) as mon:
        assert mon.config.polling.policy == "backoff"
        await mon.track(ids)
        assert set(await mon.wait(ids, timeout=15)) == set(ids)
    with pytest.raises(TypeError, match="unknown override"):
        Monitor.from_config(config, colour="blue")


# -- supervision: a task that dies fails the Monitor, loudly ----------------------------------------


async def _assert_fails_loudly(mon: Monitor, ids: list[str], task: str) -> MonitorFailed:
    failures: list[Event] = []
    mon.subscribe(lambda e: failures.append(e) if isinstance(e, Failed) else None)
    with pytest.raises(MonitorFailed) as raised:
        await mon.wait(ids, timeout=15)
    assert isinstance(raised.value.__cause__, RuntimeError), raised.value.__cause__
    assert "injected" in str(raised.value.__cause__)
    assert re.search(task, str(raised.value)), raised.value
    ok, reason = mon.health()
    assert not ok
    assert reason is not None
    assert "injected" in reason
    assert len(failures) == 1
    with pytest.raises(MonitorFailed):  # nothing more is accepted either
        await mon.track(ids)
    return raised.value


def _boom(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("injected")


async def test_a_dying_scheduler_fails_the_monitor(sim: tuple[Simulator, str], monkeypatch: pytest.MonkeyPatch) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=30.0)
    async with monitor_for(url) as mon:
        monkeypatch.setattr(mon.scheduler.policy, "choose", _boom)
        await mon.track(ids)
        await _assert_fails_loudly(mon, ids, "execmon-scheduler")


async def test_a_dying_deadline_watcher_fails_the_monitor(
    sim: tuple[Simulator, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    simulator, url = sim
    ids = simulator.create(count=1, duration_s=30.0)
    async with monitor_for(url) as mon:
        monkeypatch.setattr(mon.scheduler, "_expired", _boom)
        mon.scheduler.hold("test")  # no poll: only the deadline watcher meets the injected fault
        await mon.track(ids, deadline=0.2)
        await _assert_fails_loudly(mon, ids, "execmon-scheduler")


async def test_a_dying_poll_fails_the_monitor(sim: tuple[Simulator, str]) -> None:
    simulator, url = sim
    ids = simulator.create(count=1, duration_s=30.0)
    async with monitor_for(url) as mon:
        mon.subscribe(lambda e: _boom() if isinstance(e, Polled) else None)
        await mon.track(ids)
        await _assert_fails_loudly(mon, ids, "execmon-poll")


async def test_a_dying_sink_worker_fails_the_monitor(
    sim: tuple[Simulator, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulator, url = sim
    short = simulator.create(count=1, duration_s=0.5)
    long = simulator.create(count=1, duration_s=30.0)
    async with monitor_for(url, sinks=[f"jsonl:{tmp_path / 'out.jsonl'}"]) as mon:
        monkeypatch.setattr(Lane, "_attempt", _boom)
        await mon.track(short + long)
        await mon.wait(short, timeout=15)  # the result is recorded first; its delivery then kills the worker
        await _assert_fails_loudly(mon, long, "execmon-sink-jsonl")


@pytest.mark.parametrize(
    ("target", "task"),
    [
        ("metrics.set_budget", "execmon-metrics"),
        # Reads flush the bookkeeping first, so the metrics task may meet the fault before the flusher.
        ("store.flush_polls", "execmon-(poll-bookkeeping|metrics)"),
    ],
)
async def test_a_dying_housekeeping_task_fails_the_monitor(
    sim: tuple[Simulator, str], monkeypatch: pytest.MonkeyPatch, target: str, task: str
) -> None:
    simulator, url = sim
    ids = simulator.create(count=1, duration_s=30.0)
    async with monitor_for(url) as mon:
        owner, name = target.split(".")
        monkeypatch.setattr(getattr(mon, owner), name, _boom)
        await mon.track(ids)
        await _assert_fails_loudly(mon, ids, task)
        monkeypatch.undo()  # closing flushes too


class _HoldingSink:
    """A Sink object handed to the constructor: its concurrency and hold time must be kept."""

    name: str | None = None
    concurrency = 3
    hold_s = 5.0

    async def open(self) -> None:
        return None

    async def send(self, record: dict[str, object]) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_sink_object_keeps_its_concurrency_and_hold_time(sim: tuple[Simulator, str]) -> None:
    _, url = sim
    async with monitor_for(url, sinks=[_HoldingSink()]) as mon:
        [handle] = mon.delivery.sinks
    assert handle.name == "_HoldingSink#1"
    assert handle.concurrency == 3
    assert handle.config.timeout_s == 10.0 + 5.0  # the default timeout plus the time it may hold a record


def _runs_learned(mon: Monitor) -> dict[str | None, int]:
    learned = mon.scheduler.policy.export_learning()
    assert learned is not None
    runs = learned["runs"]
    assert isinstance(runs, list)
    return {item["kind"]: item["n"] for item in runs}


async def test_a_restarted_monitor_starts_with_the_run_times_it_learned(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    state = tmp_path / "state.db"
    ids = simulator.create(count=5, duration_s=1.0, outcome="completed")
    async with monitor_for(url, state=state) as mon:
        await mon.track(ids, labels={"kind": "etl"})
        await mon.wait(ids, timeout=30)
        assert _runs_learned(mon) == {"etl": 5}
    async with monitor_for(url, state=state) as again:
        assert _runs_learned(again) == {"etl": 5}  # before any new run ended
        more = simulator.create(count=2, duration_s=1.0, outcome="completed")
        await again.track(more, labels={"kind": "etl"})
        await again.wait(more, timeout=30)
        assert _runs_learned(again) == {"etl": 7}
    with Store.open(state) as store:
        saved = store.load_learning()
    assert saved is not None
    assert {item["kind"]: item["n"] for item in json.loads(saved)["runs"]} == {"etl": 7}

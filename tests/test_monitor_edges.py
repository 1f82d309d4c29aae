"""The Monitor's edges (issue 9): a wall clock that stepped back under the budget history, results
waiting for a sink that is no longer configured, and a reload that must be all or nothing.

Against the real simulator on loopback, in one event loop, with real state files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from monitor import Monitor, Outcome
from monitor.config import Config, load_config
from monitor.errors import UsageError
from monitor.events import Event, Polled
from monitor.rates import RateLimit
from monitor.records import TerminalEvent, build_result_record
from monitor.secrets import Secret
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator
from monitor.sinks.registry import parse_sink_spec
from monitor.state.rows import TrackRequest
from monitor.state.store import Store

KEY = "sk_test_monitor_edges"
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


# -- budget stamps from a wall clock that later stepped back ------------------------------------------


async def test_future_budget_stamps_count_as_now_and_are_logged_once(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    state = tmp_path / "state.db"
    ahead_s = 600.0
    with Store.open(state) as store:  # a whole window's worth of answered requests, 10 min "ahead"
        for _ in range(30):
            stamp = time.time() + ahead_s
            store.complete_request(store.record_request(stamp), stamp)
    [execution_id] = simulator.create(count=1, duration_s=0.5, outcome="completed")
    first_poll = asyncio.get_running_loop().create_future()

    def on_event(event: Event) -> None:
        if isinstance(event, Polled) and not first_poll.done():
            first_poll.set_result(time.monotonic())

    with capture_logs() as logs:
        async with monitor_for(url, state=state) as mon:
            mon.subscribe(on_event)
            started = time.monotonic()
            await mon.track([execution_id])
            # Counted as made now, the window (3 s) frees at once; taken as stamped, in 10 minutes.
            polled_at = await asyncio.wait_for(first_poll, timeout=8)
            assert polled_at - started < 3.0 + 2.0
            assert (await mon.wait([execution_id], timeout=10))[execution_id].outcome is Outcome.COMPLETED
    warnings = [e for e in logs if "stamped in the future" in e["event"]]
    assert len(warnings) == 1, warnings
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["requests"] == 30
    assert ahead_s - 5 < warnings[0]["ahead_s"] <= ahead_s


# -- results pending for a sink that is no longer configured ------------------------------------------


def state_with_orphans(path: Path, sink: str, count: int) -> list[str]:
    """Terminal executions whose results wait for `sink` only (an earlier run's sink)."""
    ids = [f"exec_orphan{n}" for n in range(count)]
    with Store.open(path) as store:
        store.track_many([TrackRequest(i, tracked_since=time.time()) for i in ids])
        for execution_id in ids:
            event = TerminalEvent(execution_id, Outcome.COMPLETED, time.time(), time.time() - 5, 3)
            store.finish(execution_id, Outcome.COMPLETED, build_result_record(event), [sink])
    return ids


def gauge(mon: Monitor, name: str) -> float:
    text = mon.metrics.render()[0].decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == name]
    return float(family.samples[0].value)


async def test_orphaned_rows_are_reported_at_start_and_counted_in_the_outbox_depth(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    _, url = sim
    state = tmp_path / "state.db"
    state_with_orphans(state, "old-hook", 3)
    with capture_logs() as logs:
        async with monitor_for(url, state=state, sinks=[f"jsonl:{tmp_path / 'new.jsonl'}"]) as mon:
            assert mon.orphaned_outbox() == {"old-hook": 3}
            assert gauge(mon, "execmon_outbox_depth") == 3
            assert await mon.delivery.drain(timeout=1)  # nothing a configured sink must do
    [warning] = [e for e in logs if e["event"] == "results wait for a sink that is not configured"]
    assert warning["log_level"] == "warning"
    assert (warning["sink"], warning["pending"]) == ("old-hook", 3)
    assert "old-hook" in warning["hint"]
    with Store.open(state, read_only=True) as store:
        assert store.configured_sinks() == ["jsonl"]  # what `execmon dead-letters` compares with
        assert store.pending_count("old-hook") == 3  # kept, for a sink of that name to deliver


# -- a reload is all or nothing ----------------------------------------------------------------------


def reloaded(mon: Monitor, url: str, *, rate: str, sinks: list[str]) -> Config:
    config = load_config(
        None,
        overrides={"api.base_url": url, "api.rate_limit": rate, "sinks": [parse_sink_spec(s) for s in sinks]},
    )
    return dataclasses.replace(config, env_api_key=Secret(KEY))


async def test_a_reload_whose_sink_cannot_open_changes_nothing(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    old_out = tmp_path / "old.jsonl"
    first = simulator.create(count=2, duration_s=0.5, outcome="completed")
    async with monitor_for(url, sinks=[f"jsonl:{old_out}"]) as mon:
        await mon.track(first)
        await mon.wait(first, timeout=10)
        old_config, old_sinks = mon.config, mon.delivery.sinks
        # A new rate of 1 request a minute would starve the polls below if it were applied.
        bad = reloaded(
            mon, url, rate="1/60s", sinks=[f"jsonl:{tmp_path / 'fine.jsonl'}", f"jsonl:{tmp_path / 'no-dir' / 'x'}"]
        )
        with pytest.raises(UsageError, match="no-dir"):
            await mon.reload(bad)
        assert mon.config is old_config
        assert mon.budget.rate == RateLimit(30, 3.0)
        assert mon.delivery.sinks == old_sinks
        second = simulator.create(count=3, duration_s=1.0, outcome="completed")
        await mon.track(second)
        assert set(await mon.wait(second, timeout=10)) == set(second)  # the old client and rate poll on
        assert await mon.delivery.drain(timeout=5)
        assert mon.health() == (True, None)
    assert len(old_out.read_text().splitlines()) == 5  # every result still reached the old sink


async def test_a_good_reload_swaps_the_rate_and_the_sinks(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    new_out = tmp_path / "new.jsonl"
    async with monitor_for(url, sinks=[f"jsonl:{tmp_path / 'old.jsonl'}"]) as mon:
        await mon.reload(reloaded(mon, url, rate="20/2s", sinks=[f"jsonl:{new_out}"]))
        assert mon.budget.rate == RateLimit(20, 2.0)
        ids = simulator.create(count=2, duration_s=0.5, outcome="completed")
        await mon.track(ids)
        await mon.wait(ids, timeout=10)
        assert await mon.delivery.drain(timeout=5)
    assert len(new_out.read_text().splitlines()) == 2

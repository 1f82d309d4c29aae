"""The engine against the real simulator on loopback, in one event loop: a real SQLite state file,
a real jsonl sink, no mocks. Executions last 1-3 s so the whole file stays fast."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import Config, load_config
from monitor.engine import Monitor
from monitor.rates import RateLimit
from monitor.service.backend import MonitorBackend
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator

KEY = "sk_test_engine_one"
KEY2 = "sk_test_engine_two"
RATE = RateLimit(30, 3.0)  # the simulator enforces what the engine is told
SETTLE_S = 15.0


@pytest.fixture
async def sim() -> AsyncIterator[tuple[Simulator, str]]:
    runner, url = await start_simulator(SimulatorSettings(api_keys=[KEY, KEY2], rate_limit=RATE))
    try:
        yield simulator_of(runner), url
    finally:
        await runner.cleanup()


def make_config(url: str, tmp_path: Path, *, key: str = KEY, sinks: list[dict[str, Any]] | None = None) -> Config:
    jsonl = {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}
    return load_config(
        None,
        env={"EXECMON_API_KEY": key},
        overrides={
            "api.base_url": url,
            "api.rate_limit": "30/3s",
            "control.grace_s": "2s",
            "sinks": [jsonl, *(sinks or [])],
        },
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truth_of(sim: Simulator) -> dict[str, str]:
    return {t.execution_id: t.status for t in sim.truth()}


async def wait_for(check: Callable[[], bool], what: str, timeout_s: float = SETTLE_S) -> None:
    """Poll a condition on the engine's state (there is no event to wait on); fail saying `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"{what} (within {timeout_s:g} s)")
        await asyncio.sleep(0.02)


async def settled(engine: Monitor, ids: list[str], timeout_s: float = SETTLE_S) -> None:
    """Every ID terminal in the store and every outbox row confirmed by its sink."""
    await wait_for(lambda: len(engine.outcomes(ids)) == len(ids), f"not all of {ids} became terminal", timeout_s)
    assert await engine.delivery.drain(timeout=timeout_s), "the outbox did not drain"


def assert_matches_truth(sim: Simulator, engine: Monitor, lines: list[dict[str, Any]], ids: list[str]) -> None:
    truth = truth_of(sim)
    by_id = {line["execution_id"]: line for line in lines}
    assert len(by_id) == len(lines), "an execution was written twice"
    assert sorted(by_id) == sorted(ids)
    assert len({line["event_id"] for line in lines}) == len(lines)
    assert {i: by_id[i]["outcome"] for i in ids} == {i: truth[i] for i in ids}
    assert {i: o.value for i, o in engine.outcomes(ids).items()} == {i: truth[i] for i in ids}


# -- 1. track -> terminal -> one line each ------------------------------------------------------------


async def test_tracked_executions_end_as_one_line_each_with_the_servers_outcome(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    ids = ["ex_done", "ex_broken", "ex_stopped"]
    for execution_id, outcome, duration in zip(ids, ("completed", "failed", "cancelled"), (1.0, 1.5, 2.0), strict=True):
        simulator.create(ids=[execution_id], duration_s=duration, outcome=outcome)
    out = tmp_path / "out.jsonl"
    async with Monitor(config=make_config(url, tmp_path), state=tmp_path / "state.db") as engine:
        first = engine.track_valid([*ids, ids[0]])  # a repeat inside one call counts once
        assert first.added == ids
        assert first.already_tracked == []
        since = engine.store.get(ids[0])
        assert since is not None

        again = engine.track_valid([ids[0]])
        assert again.added == []
        assert again.already_tracked == [ids[0]]
        row = engine.store.get(ids[0])
        assert row is not None
        assert row.tracked_since == since.tracked_since
        assert engine.store.count_executions(None) == 3
        assert engine.scheduler.tracked_count == 3

        await settled(engine, ids)
        lines = read_jsonl(out)
        assert_matches_truth(simulator, engine, lines, ids)
        assert all(line["polls"] >= 1 and line["finished_at"] for line in lines)

        # Tracking a finished ID again is reported and changes nothing: no new poll, no new line.
        requests = simulator.requests_total
        late = engine.track_valid(ids)
        assert late.added == []
        assert late.already_tracked == ids
        assert engine.scheduler.tracked_count == 0
        await asyncio.sleep(0.3)
        assert await engine.delivery.drain(timeout=2)
        assert simulator.requests_total == requests
    assert read_jsonl(out) == lines


# -- 2. resume ----------------------------------------------------------------------------------------


async def test_a_new_engine_on_the_same_state_resumes_and_delivers_each_result_once(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    short = simulator.create(count=2, duration_s=1.0, outcome="completed")
    long = simulator.create(count=3, duration_s=3.5, outcome="failed")
    ids = short + long
    state, out = tmp_path / "state.db", tmp_path / "out.jsonl"
    config = make_config(url, tmp_path)

    async with Monitor(config=config, state=state) as first:
        assert (await first.track(ids)).added == ids
        await wait_for(lambda: len(read_jsonl(out)) == len(short), "the short executions were not delivered")
        await wait_for(lambda: first.store.count_executions("running") == len(long), "the long ones were not polled")
        assert await first.delivery.drain(timeout=2)
        assert set(first.outcomes(ids)) == set(short)
        assert first.budget.stats().used > 0
        polls_before = {i: first.store.get(i).polls for i in long}  # type: ignore[union-attr]
    assert all(truth_of(simulator)[i] == "running" for i in long), "stopped too late to test resuming"
    assert all(p >= 1 for p in polls_before.values())

    async with Monitor(config=config, state=state) as second:
        # Nothing has been sent yet by this engine, yet the window already holds the first one's requests.
        stats = second.budget.stats()
        assert stats.requests == 0
        assert stats.used > 0
        assert sorted(second.scheduler.tracked_ids()) == sorted(long)  # resumed without a new track
        await settled(second, ids)
        assert second.delivery.counters()["jsonl"].delivered == len(long)  # the short ones were not resent
        lines = read_jsonl(out)
        assert_matches_truth(simulator, second, lines, ids)
        for line in lines:
            if line["execution_id"] in long:  # the poll count carried over from the first run
                assert line["polls"] > polls_before[line["execution_id"]]
    assert simulator.stats()["max_requests_in_window"] <= RATE.limit
    assert simulator.stats()["responses"]["429"] == 0


# -- 3. a rejected key, then a reload -----------------------------------------------------------------


async def test_a_revoked_key_makes_the_engine_unhealthy_until_a_reload_with_a_good_key(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=3.0, outcome="completed")
    async with Monitor(config=make_config(url, tmp_path), state=tmp_path / "state.db") as engine:
        assert engine.health() == (True, None)
        engine.track_valid(ids)
        await wait_for(lambda: engine.store.count_executions("running") == 2, "no answer came back")
        simulator.revoke(KEY)
        await wait_for(lambda: not engine.health()[0], "the engine stayed healthy after the key was revoked", 5)
        _healthy, reason = engine.health()
        assert reason is not None
        assert "401" in reason
        assert KEY not in reason
        assert MonitorBackend(engine).health() == (False, reason)

        # Blocked: nothing more is sent with the rejected key, even after the executions have ended.
        rejected = simulator.stats()["responses"]["401"]
        assert 1 <= rejected <= config_in_flight(engine)
        end = max(simulator.end_time(i) or 0.0 for i in ids)
        await asyncio.sleep(max(0.0, end - simulator.now()) + 0.5)
        assert simulator.stats()["responses"]["401"] == rejected
        assert engine.outcomes(ids) == {}
        assert engine.budget.blocked

        await engine.reload(make_config(url, tmp_path, key=KEY2))
        assert engine.health() == (True, None)
        await settled(engine, ids, timeout_s=5)
        assert_matches_truth(simulator, engine, read_jsonl(tmp_path / "out.jsonl"), ids)
        assert simulator.stats()["responses"]["401"] == rejected
        assert 'outcome="error"' in engine.metrics.render()[0].decode()


def config_in_flight(engine: Monitor) -> int:
    return engine.config.polling.max_in_flight


# -- 4. the control API's view ------------------------------------------------------------------------


@pytest.fixture
async def gated_hook() -> AsyncIterator[tuple[str, asyncio.Event, list[dict[str, Any]]]]:
    """A webhook receiver that answers 503 until its gate opens, then 200."""
    gate = asyncio.Event()
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=200 if gate.is_set() else 503)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook", gate, received
    finally:
        await runner.cleanup()


async def test_the_backend_view_shows_pending_running_outcome_and_delivery(
    sim: tuple[Simulator, str],
    tmp_path: Path,
    gated_hook: tuple[str, asyncio.Event, list[dict[str, Any]]],
) -> None:
    simulator, url = sim
    hook_url, gate, received = gated_hook
    quick = simulator.create(ids=["ex_quick"], duration_s=1.0, outcome="completed")[0]
    slow = simulator.create(ids=["ex_slow"], duration_s=2.5, outcome="failed")[0]
    webhook = {"type": "webhook", "url": hook_url, "backoff_base_s": 0.05, "backoff_cap_s": 0.1, "max_attempts": 1000}
    config = make_config(url, tmp_path, sinks=[webhook])
    async with Monitor(config=config, state=tmp_path / "state.db") as engine:
        backend = MonitorBackend(engine)
        await backend.track([quick, slow], deadline_s=None, group="batch", labels={"team": "qa"})
        # No await since the track: nothing can have been polled yet.
        view = backend.get_execution(quick)
        assert view is not None
        assert (view["state"], view["polls"], view["delivered"]) == ("pending", 0, False)
        assert view["group"] == "batch"
        assert view["labels"] == {"team": "qa"}
        assert backend.count_executions("pending") == 2
        assert backend.count_executions("running") == 0
        assert [v["state"] for v in backend.list_executions(None, 10, 0)] == ["pending", "pending"]
        assert backend.get_execution("ex_unknown") is None

        await wait_for(lambda: _state(engine, slow) == "running", "the slow one never showed as running")
        running = backend.get_execution(slow)
        assert running is not None
        assert running["polls"] >= 1
        assert running["last_polled_at"] is not None

        # Terminal, written to the jsonl sink, but the webhook has not confirmed: not delivered.
        await wait_for(lambda: _state(engine, quick) == "completed", "the quick one never completed")
        await wait_for(lambda: len(received) >= 2, "the webhook was not retried")
        assert [line["execution_id"] for line in read_jsonl(tmp_path / "out.jsonl")][:1] == [quick]
        assert backend.get_execution(quick)["delivered"] is False  # type: ignore[index]
        assert [v["delivered"] for v in backend.list_executions("completed", 10, 0)] == [False]

        gate.set()
        await wait_for(lambda: backend.get_execution(quick)["delivered"] is True, "never marked delivered")  # type: ignore[index]
        await settled(engine, [quick, slow])
        final = backend.get_execution(slow)
        assert final is not None
        assert (final["state"], final["delivered"]) == ("failed", True)
        assert final["next_poll_at"] is None
        counts = {f: backend.count_executions(f) for f in ("all", "active", "terminal", "completed", "failed")}
        assert counts == {"all": 2, "active": 0, "terminal": 2, "completed": 1, "failed": 1}
        assert [v["execution_id"] for v in backend.list_executions("failed", 10, 0)] == [slow]
        page = backend.list_executions(None, 1, 1)
        assert len(page) == 1
        assert page[0]["execution_id"] in {quick, slow}
        assert page[0]["execution_id"] != backend.list_executions(None, 1, 0)[0]["execution_id"]
        hook_ids = {r["execution_id"] for r in received if r.get("kind") == "execution"}
        assert hook_ids == {quick, slow}


def _state(engine: Monitor, execution_id: str) -> str | None:
    view = MonitorBackend(engine).get_execution(execution_id)
    return None if view is None else str(view["state"])


# -- 5. metrics ---------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_requests_by_outcome_and_observe_detection_delays(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    done = simulator.create(count=2, duration_s=3.0, outcome="completed")
    failed = simulator.create(count=1, duration_s=3.0, outcome="failed")
    async with Monitor(config=make_config(url, tmp_path), state=tmp_path / "state.db") as engine:
        engine.track_valid(done + failed)
        await settled(engine, done + failed)
        samples = _samples(engine.metrics.render()[0].decode())

        def requests(outcome: str) -> float:
            return samples.get(("execmon_api_requests_total", (("outcome", outcome),)), 0.0)

        assert requests("completed") == 2  # one terminal answer each, then the ID is forgotten
        assert requests("failed") == 1
        assert requests("running") >= 3
        by_outcome = sum(v for (name, _), v in samples.items() if name == "execmon_api_requests_total")
        assert by_outcome == simulator.requests_total  # every request the server saw, counted once
        assert samples[("execmon_detection_delay_seconds_count", ())] == 3
        assert samples[("execmon_detection_delay_seconds_bucket", (("le", "+Inf"),))] == 3
        assert samples[("execmon_detection_delay_seconds_bucket", (("le", "10.0"),))] == 3
        assert samples[("execmon_sink_deliveries_total", (("result", "ok"), ("sink", "jsonl")))] == 3


# -- shutdown -----------------------------------------------------------------------------------------


async def test_shutdown_leaves_no_engine_task_behind(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    ids = simulator.create(count=2, duration_s=30.0, outcome="completed")
    before = asyncio.all_tasks()
    async with Monitor(config=make_config(url, tmp_path), state=tmp_path / "state.db") as engine:
        engine.track_valid(ids)
        await wait_for(lambda: engine.store.count_executions("running") == 2, "no answer came back")
        started = {t.get_name() for t in asyncio.all_tasks() - before}
        assert {"execmon-scheduler", "execmon-metrics"} <= started
    # The metrics refresher reads the store, which shutdown closes: a task left running would
    # fail with "the engine is not running" on its next round.
    left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
    assert [n for n in left if n.startswith("execmon-")] == []
    with pytest.raises(RuntimeError, match="not running"):
        engine.store  # noqa: B018 - the property raises once the engine is shut down

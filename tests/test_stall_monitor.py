"""Stalls end to end in one process: the real Monitor, client, simulator and jsonl sinks, on virtual time.

Hours of executions take seconds: a run that freezes for an hour is reported once when it crosses
`stall_after` (auto by default, or fixed) and once more when it resumes, to the sinks that ask
for those kinds only; the live-view events, the store's `stalled` filter, the control API's view
and the metric all say so while it is frozen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

from monitor import Monitor, vtime
from monitor.clock import parse_iso
from monitor.config import load_config
from monitor.events import Event, Resumed, Stalled
from monitor.rates import RateLimit
from monitor.schedule import stalls
from monitor.secrets import Secret
from monitor.service.backend import MonitorBackend
from monitor.simulator.scenario import Stall
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator

KEY = "sk_test_stalls"


def _monitor(url: str, tmp: Path, **polling: Any) -> Monitor:
    sinks = [
        {"type": "jsonl", "name": "alarms", "path": str(tmp / "stalls.jsonl"), "events": ["stalled", "resumed"]},
        {"type": "jsonl", "name": "results", "path": str(tmp / "results.jsonl")},
    ]
    flags = {"api.base_url": url, "api.rate_limit": "30/60s", "sinks": sinks}
    flags |= {f"polling.{key}": value for key, value in polling.items()}
    config = dataclasses.replace(load_config(None, overrides=flags), env_api_key=Secret(KEY))
    return Monitor(config=config)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _truth(simulator: Simulator, execution_id: str) -> tuple[float, float]:
    """(stalled_from, stalled_until) as epoch seconds."""
    [row] = [t for t in simulator.truth() if t.execution_id == execution_id]
    assert row.stalled_from is not None
    assert row.stalled_until is not None
    return simulator.clock.wall(row.stalled_from), simulator.clock.wall(row.stalled_until)


async def _scenario(tmp: Path, stall: Stall, **polling: Any) -> dict[str, Any]:
    runner, url = await start_simulator(SimulatorSettings(api_keys=[KEY], rate_limit=RateLimit(30, 60.0)))
    simulator = simulator_of(runner)
    seen: dict[str, Any] = {"events": []}
    first = asyncio.Event()
    try:
        ids = simulator.create(count=5, duration_s=7200.0, outcome="completed")
        [frozen] = simulator.create(count=1, duration_s=7200.0, outcome="completed", stall=stall)
        async with _monitor(url, tmp, **polling) as mon:

            def on_event(event: Event) -> None:
                if isinstance(event, Stalled | Resumed):
                    seen["events"].append(event)
                    first.set()

            mon.subscribe(on_event)
            await mon.track([*ids, frozen], labels={"kind": "etl"})
            await first.wait()
            await asyncio.sleep(10)  # the metrics task samples every 5 s
            seen["view"] = MonitorBackend(mon).get_execution(frozen)
            seen["listed"] = [r.execution_id for r in mon.store.list_executions("stalled")]
            seen["metric"] = mon.metrics.registry.get_sample_value("execmon_stalled_executions", {"kind": "etl"})
            done = await mon.wait([*ids, frozen], timeout=6 * 3600)
        seen["outcome"] = done[frozen].outcome.value
        seen["frozen"], seen["others"] = frozen, ids
        seen["truth"] = _truth(simulator, frozen)
    finally:
        await runner.cleanup()
    return seen


def test_a_run_frozen_for_an_hour_gives_one_stalled_and_one_resumed_record(tmp_path: Path) -> None:
    seen = vtime.run(_scenario(tmp_path, Stall(at_s=1500.0, for_s=3600.0, then="resume")))  # stall_after auto
    frozen, (stalled_from, stalled_until) = seen["frozen"], seen["truth"]
    records = _lines(tmp_path / "stalls.jsonl")
    assert [(r["kind"], r["execution_id"]) for r in records] == [("stalled", frozen), ("resumed", frozen)]
    stalled, resumed = records
    assert stalled["labels"] == {"kind": "etl"}
    assert stalled["stall_after_s"] >= stalls.FLOOR_S  # auto: at least 10 min
    last_change = parse_iso(stalled["last_change_at"])
    observed = parse_iso(stalled["observed_at"])
    assert last_change is not None
    assert observed is not None
    assert stalled_from - 120 <= last_change <= stalled_from  # its last change before the freeze
    assert last_change + stalled["stall_after_s"] <= observed < stalled_until
    assert observed - (last_change + stalled["stall_after_s"]) < 60  # looked at when it crossed
    assert resumed["last_change_at"] == stalled["last_change_at"]
    assert (parse_iso(resumed["observed_at"]) or 0) >= stalled_until
    assert resumed["stalled_for_s"] >= 3600
    # Only the sink that asked for them; the other has the six results and nothing else.
    assert sorted(r["kind"] for r in _lines(tmp_path / "results.jsonl")) == ["execution"] * 6
    assert seen["outcome"] == "completed"
    # While it was frozen: the live-view event, the `stalled` filter, the view, the metric.
    assert isinstance(seen["events"][0], Stalled)
    assert seen["listed"] == [frozen]
    assert seen["view"]["stalled_since"] == stalled["last_change_at"]
    assert seen["metric"] == 1.0


def test_a_fixed_stall_after_below_ten_minutes_and_a_stall_that_fails(tmp_path: Path) -> None:
    seen = vtime.run(_scenario(tmp_path, Stall(at_s=1500.0, for_s=900.0, then="fail"), stall_after="2m"))
    frozen, (stalled_from, stalled_until) = seen["frozen"], seen["truth"]
    records = _lines(tmp_path / "stalls.jsonl")
    assert [(r["kind"], r["execution_id"]) for r in records] == [("stalled", frozen)]  # it never moved again
    assert records[0]["stall_after_s"] == 120.0
    last_change = parse_iso(records[0]["last_change_at"]) or 0
    assert last_change <= stalled_from
    assert last_change + 120 <= (parse_iso(records[0]["observed_at"]) or 0) < stalled_until
    assert seen["outcome"] == "failed"

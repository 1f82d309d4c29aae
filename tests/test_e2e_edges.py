"""Issue 9's smaller edges end to end, with real `execmon watch`, `execmon run` and `execmon simulate`
processes: results left for a sink that is no longer configured, and a reload that cannot open its
sinks.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from e2e import (
    API_KEY,
    DaemonProc,
    Sim,
    count_lines,
    free_port,
    run_cli,
    sim_args,
    wait_for_lines,
    wait_until,
    watch,
    write_daemon_config,
)

from monitor.records import Outcome, TerminalEvent, build_result_record
from monitor.state.rows import TrackRequest
from monitor.state.store import Store

pytestmark = pytest.mark.slow

ORPHAN_EVENT = "results wait for a sink that is not configured"


def leave_results_for(state: Path, sink: str, ids: list[str]) -> None:
    """What an earlier run with another sink left: these IDs ended, their results pending for `sink`."""
    with Store.open(state) as store:
        store.track_many([TrackRequest(i, tracked_since=time.time()) for i in ids])
        for execution_id in ids:
            event = TerminalEvent(execution_id, Outcome.COMPLETED, time.time(), time.time() - 5, 3)
            store.finish(execution_id, Outcome.COMPLETED, build_result_record(event), [sink])


def test_a_watch_ends_despite_results_pending_for_a_sink_it_does_not_have(tmp_path: Path) -> None:
    state, out = tmp_path / "state.db", tmp_path / "b.jsonl"
    with Sim.running(tmp_path, "--rate-limit", "30/3s") as sim:
        earlier = sim.create(2, duration_s=0.5)
        fresh = sim.create(2, duration_s=1.0)
        leave_results_for(state, "old", earlier)
        result = watch(
            [*sim_args(sim, "--state", str(state), "--sink", f"jsonl:{out}"), "-"],
            tmp=tmp_path,
            ids=earlier + fresh,
            timeout_s=30,  # before the fix it waited for the orphans until killed here
        )
    assert result.rc == 0, result  # every outcome completed; the orphans are kept, not lost
    assert sorted(r["execution_id"] for r in map(json.loads, out.read_text().splitlines())) == sorted(fresh)
    lines = result.log_lines()
    [at_start] = [e for e in lines if e["event"] == ORPHAN_EVENT]
    assert (at_start["level"], at_start["sink"], at_start["pending"]) == ("warning", "old", 2)
    [at_end] = [e for e in lines if e["event"] == "results left waiting for a sink this watch does not have"]
    assert (at_end["level"], at_end["sink"], at_end["pending"]) == ("warning", "old", 2)
    assert "'old'" in at_end["hint"]

    listing = run_cli("dead-letters", "--state", str(state))
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count("pending for sink 'old', which is not configured") == 2
    assert "2 result(s) wait for sinks no longer configured ('old')" in listing.stdout
    as_json = run_cli("dead-letters", "--state", str(state), "--json")
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert sorted((r["state"], r["sink"], r["execution_id"]) for r in rows) == [("orphaned", "old", i) for i in earlier]


def test_a_reload_whose_sink_cannot_open_is_refused_and_the_old_config_keeps_working(tmp_path: Path) -> None:
    port, state, out = free_port(), tmp_path / "state.db", tmp_path / "out.jsonl"
    with Sim.running(tmp_path, "--rate-limit", "30/3s") as sim:
        sinks = [{"type": "jsonl", "path": str(out)}]
        config = write_daemon_config(tmp_path / "execmon.toml", sim, port=port, state=state, sinks=sinks)
        with DaemonProc(config, port, tmp=tmp_path) as daemon:
            daemon.wait_healthy()
            # A rate that would starve the polls below, and a sink that cannot open.
            broken = [*sinks, {"type": "jsonl", "name": "new", "path": str(tmp_path / "no-dir" / "x.jsonl")}]
            write_daemon_config(config, sim, port=port, state=state, sinks=broken, rate="1/60s")
            daemon.signal(signal.SIGHUP)
            assert wait_until(lambda: "config reload refused" in daemon.stderr(), 10), daemon.stderr()[-2000:]
            [refused] = [e for e in daemon.log_lines() if "config reload refused" in e["event"]]
            assert refused["level"] == "error"
            assert "no-dir" in refused["error"], refused
            assert not [e for e in daemon.log_lines() if e["event"] == "config reloaded"]

            ids = sim.create(6, duration_s=1.0)
            added = run_cli("add", "--config", str(config), "-", stdin="".join(f"{i}\n" for i in ids))
            assert added.returncode == 0, added.stderr
            # Six results in seconds: at the refused rate (one request a minute) they would take minutes.
            assert wait_for_lines(out, len(ids), 15), (count_lines(out), daemon.stderr()[-2000:])
            assert daemon.health() is not None
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(15) == 0, daemon.stderr()[-2000:]
    assert API_KEY not in daemon.stderr()

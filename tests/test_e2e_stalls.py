"""Stall records across a restart, with real processes: `execmon run` against `execmon simulate`.

A run freezes for 20 s (`stall_after = "3s"`): the daemon reports it once, is SIGKILLed after the
record reached the sinks, and is started again while the run is still frozen. The second daemon
must not report the same freeze again (it restores the stall from the state file, and the freeze's
event_id is the same anyway); when the run moves again, one `resumed` record follows. A webhook
receiver counts every POST (the jsonl sink would drop a duplicate event_id by itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import (
    RATE,
    DaemonProc,
    Sim,
    WebhookReceiver,
    free_port,
    iso_seconds,
    read_jsonl,
    run_cli,
    wait_for_lines,
    wait_until,
    write_daemon_config,
)

pytestmark = pytest.mark.slow

EVENTS = ["stalled", "resumed"]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


def _kinds(receiver: WebhookReceiver) -> list[tuple[str, str]]:
    records = [post.record() for post in receiver.accepted()]
    return [(r["kind"], r["execution_id"]) for r in records]


def _logged(daemon: DaemonProc, event: str) -> list[dict[str, Any]]:
    return [line for line in daemon.log_lines() if line.get("event") == event]


def test_a_restart_while_stalled_reports_the_freeze_once_and_the_resume_once(sim: Sim, tmp_path: Path) -> None:
    body = {"count": 1, "duration_s": 20, "outcome": "completed", "stall": {"at_s": 3, "for_s": 20, "then": "resume"}}
    code, answer = sim.request("/_sim/executions", body)
    assert code == 200, answer
    [frozen] = answer["execution_ids"]
    [moving] = sim.create(1, duration_s=20, outcome="completed")
    out, port = tmp_path / "stalls.jsonl", free_port()
    with WebhookReceiver() as receiver:
        sinks = [
            {"type": "jsonl", "path": str(out), "events": EVENTS},
            {"type": "webhook", "url": receiver.url, "events": EVENTS},
        ]
        config = write_daemon_config(
            tmp_path / "execmon.toml",
            sim,
            port=port,
            state=tmp_path / "state.db",
            sinks=sinks,
            polling={"stall_after": "3s"},
        )
        with DaemonProc(config, port, tmp=tmp_path, name="first") as first:
            first.wait_healthy()
            added = first.api("POST", "/v1/executions", {"ids": [frozen, moving], "labels": {"kind": "etl"}})
            assert added.status == 201, added.body
            assert wait_for_lines(out, 1, 20), first.stderr()[-2000:]
            assert wait_until(lambda: len(receiver.accepted()) == 1, 10), first.stderr()[-2000:]
            assert _kinds(receiver) == [("stalled", frozen)]
            _while_stalled(config, first, frozen)
            time.sleep(1.5)  # the poll bookkeeping (the stall among it) is written once a second
            first.kill()
        frozen_until = iso_seconds(sim.truth()[frozen]["stalled_until"])
        assert time.time() < frozen_until - 2, "the run must still be frozen when the daemon restarts"
        with DaemonProc(config, port, tmp=tmp_path, name="second") as second:
            second.wait_healthy()
            assert wait_until(lambda: len(receiver.accepted()) >= 2, 30), second.stderr()[-2000:]
            time.sleep(1.5)  # anything still on its way would arrive now
            assert _kinds(receiver) == [("stalled", frozen), ("resumed", frozen)]
            assert not _logged(second, "execution stalled")  # restored: not even seen as new
            assert len(_logged(second, "execution resumed")) == 1
    stalled, resumed = (post.record() for post in receiver.accepted())
    assert resumed["last_change_at"] == stalled["last_change_at"]
    assert resumed["stalled_for_s"] >= 15
    assert [r["kind"] for r in read_jsonl(out)] == EVENTS


def _while_stalled(config: Path, daemon: DaemonProc, frozen: str) -> None:
    """`execmon ls --status stalled`, the execution view and /metrics all show the frozen run."""

    def listed() -> list[dict[str, Any]]:
        result = run_cli("ls", "--config", str(config), "--status", "stalled", "--json")
        assert result.returncode == 0, result.stderr
        executions: list[dict[str, Any]] = json.loads(result.stdout)["executions"]
        return executions

    assert wait_until(lambda: [e["execution_id"] for e in listed()] == [frozen], 5), daemon.stderr()[-2000:]
    assert listed()[0]["stalled_since"] is not None
    view = daemon.api("GET", f"/v1/executions/{frozen}").json()
    assert view["stalled_since"] == listed()[0]["stalled_since"]

    def metric() -> bool:
        text = daemon.api("GET", "/metrics").body.decode()
        return 'execmon_stalled_executions{kind="etl"} 1.0' in text

    assert wait_until(metric, 10), daemon.api("GET", "/metrics").body.decode()[-2000:]

"""Dead letters with a daemon running: the gauge after a restart, and `execmon dead-letters --retry`
through the control API (`POST /v1/dead-letters/retry`), against real processes on loopback."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import (
    RATE,
    DaemonProc,
    Sim,
    WebhookReceiver,
    free_port,
    run_cli,
    wait_until,
    write_daemon_config,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


def gauge(daemon: DaemonProc, name: str) -> float | None:
    answer = daemon.api("GET", "/metrics")
    assert answer.status == 200, answer.body[:200]
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def test_dead_letters_survive_a_restart_in_the_gauge_and_are_retried_through_the_daemon(
    sim: Sim, tmp_path: Path
) -> None:
    port, state = free_port(), tmp_path / "state.db"
    ids = sim.create(3, duration_s=1, outcome="completed")
    with WebhookReceiver(fail_first=3) as hook:  # each result's one allowed attempt gets a 500
        sinks = [{"type": "webhook", "url": hook.url, "max_attempts": 1}]
        config = write_daemon_config(tmp_path / "execmon.toml", sim, port=port, state=state, sinks=sinks)
        with DaemonProc(config, port, tmp=tmp_path) as daemon:
            daemon.wait_healthy()
            assert run_cli("add", "--config", str(config), *ids).returncode == 0
            assert wait_until(lambda: gauge(daemon, "execmon_dead_letters") == 3, 30), daemon.stderr()[-2000:]
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(20) == 0
        with DaemonProc(config, port, tmp=tmp_path) as daemon:
            daemon.wait_healthy()
            assert gauge(daemon, "execmon_dead_letters") == 3  # read from the state file at start
            assert gauge(daemon, "execmon_sink_circuit_open") == 0
            listing = run_cli("dead-letters", "--config", str(config))
            assert listing.returncode == 0, listing.stderr
            assert "3 dead letter(s)" in listing.stdout
            retried = run_cli("dead-letters", "--config", str(config), "--retry")
            assert retried.returncode == 0, retried.stderr
            assert "3 dead letter(s) queued again by the running daemon" in retried.stdout
            assert wait_until(lambda: len(hook.accepted()) == 3, 15), hook.snapshot()
            assert wait_until(lambda: gauge(daemon, "execmon_dead_letters") == 0, 5)
            again = daemon.api("POST", "/v1/dead-letters/retry", {"sink": "webhook"})
            assert (again.status, again.json()) == (200, {"retried": 0})
            bad = daemon.api("POST", "/v1/dead-letters/retry", {"sink": 5})
            assert (bad.status, bad.json()["error"]["code"]) == (400, "bad_request")
            assert daemon.api("POST", "/v1/dead-letters/retry", {}, token=None).status == 401
    assert sorted(post.record()["execution_id"] for post in hook.accepted_by_key().values()) == sorted(ids)

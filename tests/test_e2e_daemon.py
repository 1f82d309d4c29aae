"""`execmon run` end to end: the daemon as a real process against `execmon simulate`, driven by
`execmon add/ls/status/rm`, signals and plain HTTP on loopback.

Black-box: exit codes, the jsonl file, the control API's answers, log lines, and the simulator's
ground truth (`/_sim/stats`, `/_sim/executions`) are all that is looked at.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e import (
    API_KEY,
    CONTROL_TOKEN,
    LIMIT,
    DaemonProc,
    HttpAnswer,
    Sim,
    assert_delivered_once,
    by_id,
    count_lines,
    daemon_env,
    free_port,
    read_jsonl,
    run_cli,
    wait_for_lines,
    wait_until,
    write_daemon_config,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

pytestmark = pytest.mark.slow

SPARE_KEY = "sk_test_e2e_spare"  # the simulator accepts it too: the key a rotation switches to
MAX_IN_FLIGHT = 4


@dataclass
class Rig:
    """One simulator, one config and state file, one jsonl sink: what every daemon test starts from."""

    tmp: Path
    sim: Sim
    port: int
    config: Path
    state: Path
    out: Path

    def start(self, *, healthy: bool = True) -> DaemonProc:
        daemon = DaemonProc(self.config, self.port, tmp=self.tmp)
        if healthy:
            daemon.wait_healthy()
        return daemon

    def cli(self, *args: str, stdin: str | None = None) -> Any:
        return run_cli(*args, "--config", str(self.config), stdin=stdin)

    def add(self, ids: list[str]) -> str:
        """`execmon add -` with the IDs on stdin; returns its one line."""
        result = self.cli("add", "-", stdin="".join(f"{i}\n" for i in ids))
        assert result.returncode == 0, result.stderr
        return str(result.stdout)

    def ls(self) -> dict[str, dict[str, Any]]:
        """`execmon ls --json`, by execution ID."""
        result = self.cli("ls", "--json")
        assert result.returncode == 0, result.stderr
        listing = json.loads(result.stdout)
        assert listing["total"] == len(listing["executions"])
        return {view["execution_id"]: view for view in listing["executions"]}


def make_rig(tmp: Path, sim: Sim, rate: str = "30/3s", **options: Any) -> Rig:
    port = free_port()
    state, out = tmp / "state.db", tmp / "out.jsonl"
    sinks = options.pop("sinks", [{"type": "jsonl", "path": str(out)}])
    config = write_daemon_config(tmp / "execmon.toml", sim, port=port, state=state, sinks=sinks, rate=rate, **options)
    return Rig(tmp, sim, port, config, state, out)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", "30/3s", api_keys=(API_KEY, SPARE_KEY)) as running:
        yield running


@pytest.fixture
def rig(tmp_path: Path, sim: Sim) -> Rig:
    return make_rig(tmp_path, sim)


def status_of(answer: HttpAnswer | None) -> int:
    """An answer's status, 0 for no answer at all."""
    return 0 if answer is None else answer.status


def stop(daemon: DaemonProc, grace_s: float = 15.0) -> None:
    """SIGTERM and a clean exit 0, whatever else the test checked."""
    daemon.signal(signal.SIGTERM)
    rc = daemon.wait(grace_s)
    assert rc == 0, daemon.stderr()[-2000:]
    assert "Traceback" not in daemon.stderr()


def wait_all_delivered(rig: Rig, daemon: DaemonProc, count: int, timeout_s: float) -> None:
    ok = wait_for_lines(rig.out, count, timeout_s)
    assert ok, (
        f"{count_lines(rig.out)}/{count} lines after {timeout_s} s; stats {rig.sim.stats()}; {daemon.stderr()[-1500:]}"
    )
    time.sleep(0.5)  # a duplicate written late would land now


def assert_error_exit_2(result: Any) -> str:
    """Exit 2, nothing on stdout, and the error as the last line of stderr after (JSON) log lines."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == "", result.stdout
    *logs, last = result.stderr.splitlines()
    assert last.startswith("execmon run: "), result.stderr
    assert all(line.startswith("{") for line in logs), result.stderr
    return str(last)


def assert_one_line_exit_2(result: Any) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("execmon run: "), result.stderr
    return str(result.stderr)


# -- 1. crashes ---------------------------------------------------------------------------------


def test_killed_twice_mid_run_delivers_every_result_once_within_the_budget(rig: Rig, sim: Sim) -> None:
    ids: list[str] = []
    for duration in (6, 12, 18, 22):
        ids += sim.create(20, duration_s=duration, outcome="completed")
    failed = sim.create(12, duration_s=9, outcome="failed")
    cancelled = sim.create(8, duration_s=15, outcome="cancelled")
    ids += failed + cancelled
    assert len(ids) == 100
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    daemon = rig.start()
    try:
        assert rig.add(ids).startswith("100 added, 0 already tracked"), "execmon add's summary line"
        wait_for_lines(rig.out, rng.randint(5, 30), 20)
        time.sleep(rng.uniform(0.0, 0.5))  # at a random moment while results come in
        daemon.kill()
        kills = [count_lines(rig.out)]
        by_id(read_jsonl(rig.out))  # whole lines only, nothing twice
        daemon = rig.start()
        wait_for_lines(rig.out, kills[0] + rng.randint(10, 30), 20)  # right after a result line lands
        daemon.kill()
        kills.append(count_lines(rig.out))
        by_id(read_jsonl(rig.out))
        assert 0 < kills[0] < kills[1] < len(ids), f"the kills missed the deliveries (seed {seed}): {kills}"
        daemon = rig.start()
        assert rig.add(ids[:10]).startswith("0 added, 10 already tracked")  # the state survived the kills
        wait_all_delivered(rig, daemon, len(ids), 50)
        assert_delivered_once(sim, read_jsonl(rig.out), ids)
        outcomes = {r["execution_id"]: r["outcome"] for r in read_jsonl(rig.out)}
        assert {i for i, o in outcomes.items() if o == "failed"} == set(failed)
        assert {i for i, o in outcomes.items() if o == "cancelled"} == set(cancelled)
        sim.assert_budget_held(LIMIT)  # zero 429s, <= 30 in any 3 s window, across both restarts
        listing = rig.ls()
        assert sorted(listing) == sorted(ids)
        assert all(v["delivered"] for v in listing.values()), [v for v in listing.values() if not v["delivered"]]
        assert all(v["state"] == sim.truth()[i]["status"] for i, v in listing.items())
        stop(daemon)
    finally:
        daemon.kill()
    assert count_lines(rig.out) == len(ids)


# -- 2. a revoked key ---------------------------------------------------------------------------


def test_a_revoked_key_stops_polling_and_a_reload_with_a_new_key_finishes(tmp_path: Path) -> None:
    # Latency, so that several polls are in flight when the key goes bad.
    keys = (API_KEY, SPARE_KEY)
    with Sim.running(tmp_path, "--rate-limit", "30/3s", "--latency-ms", "250", api_keys=keys) as sim:
        key_file = tmp_path / "api-key"
        key_file.write_text(API_KEY + "\n")
        rig = make_rig(tmp_path, sim, api_key_file=key_file, polling={"max_in_flight": MAX_IN_FLIGHT})
        ids = sim.create(20, duration_s=10, outcome="completed")
        with rig.start() as daemon:
            rig.add(ids)
            assert wait_until(lambda: sim.stats()["responses"]["200"] >= 10, 10), sim.stats()
            sim.revoke(API_KEY)
            revoked_at = time.monotonic()

            assert wait_until(lambda: status_of(daemon.health()) == 503, 5), (
                "healthz still 200 five seconds after the key was revoked"
            )
            health = daemon.health()
            assert health is not None
            assert health.json()["status"] == "unhealthy"
            assert "401" in health.json()["reason"] or "rejected" in health.json()["reason"], health.json()
            detected_s = time.monotonic() - revoked_at
            time.sleep(2.0)  # nothing more may be spent with the dead key
            stats = sim.stats()
            assert 1 <= stats["responses"]["401"] <= MAX_IN_FLIGHT, (stats, detected_s)
            time.sleep(1.0)
            assert sim.stats()["requests_total"] == stats["requests_total"], "still polling with a rejected key"

            good = rig.config.read_text()
            rig.config.write_text(good + "[api\nbroken = \n")
            key_file.write_text(SPARE_KEY + "\n")
            daemon.signal(signal.SIGHUP)
            assert wait_until(lambda: "config reload refused" in daemon.stderr(), 5), daemon.stderr()[-2000:]
            assert daemon.running()
            refused = [e for e in daemon.log_lines() if "config reload refused" in e.get("event", "")]
            assert refused, daemon.stderr()[-2000:]
            assert refused[0]["level"] == "error", refused
            time.sleep(1.0)
            assert sim.stats()["requests_total"] == stats["requests_total"], "the refused config was applied"
            assert status_of(daemon.health()) == 503
            assert daemon.api("GET", "/v1/executions").status == 200  # the old token still works

            rig.config.write_text(good)
            daemon.signal(signal.SIGHUP)

            assert wait_until(lambda: status_of(daemon.health()) == 200, 5), daemon.stderr()[-2000:]
            wait_all_delivered(rig, daemon, len(ids), 30)
            assert_delivered_once(sim, read_jsonl(rig.out), ids)
            after = sim.assert_budget_held(LIMIT)
            assert after["responses"]["401"] == stats["responses"]["401"]
            assert API_KEY not in daemon.stderr()
            assert SPARE_KEY not in daemon.stderr()
            stop(daemon)


# -- 3. the control API -------------------------------------------------------------------------


def metric_families(daemon: DaemonProc) -> dict[str, tuple[str, list[Sample]]]:
    answer = daemon.api("GET", "/metrics")
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"].startswith("text/plain"), answer.headers
    return {f.name: (f.type, list(f.samples)) for f in text_string_to_metric_families(answer.body.decode())}


def value(families: dict[str, tuple[str, list[Sample]]], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    _, samples = families[family]
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


WANTED_FAMILIES = {
    "execmon_api_requests": "counter",
    "execmon_api_throttled": "counter",
    "execmon_budget_used": "gauge",
    "execmon_budget_free": "gauge",
    "execmon_executions_tracked": "gauge",
    "execmon_detection_delay_seconds": "histogram",
    "execmon_sink_deliveries": "counter",
    "execmon_outbox_depth": "gauge",
    "execmon_dead_letters": "gauge",
    "execmon_event_loop_lag_seconds": "gauge",
    "execmon_event_loop_stalls": "counter",
}


def test_control_api_token_validation_cli_and_metrics(rig: Rig, sim: Sim) -> None:
    with rig.start() as daemon:
        for method, path in [("GET", "/v1/executions"), ("GET", "/metrics"), ("GET", "/v1/executions/exec_x")]:
            for token in (None, "wrong-token"):
                answer = daemon.api(method, path, token=token)
                assert answer.status == 401, (method, path, token, answer)
                assert answer.json()["error"]["code"] == "unauthorized"
                assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer")
        sneaked = daemon.api("POST", "/v1/executions", {"ids": ["exec_sneaky"]}, token=None)
        assert sneaked.status == 401
        health = daemon.api("GET", "/healthz", token=None)
        assert (health.status, health.json()) == (200, {"status": "ok"})

        bad = daemon.api("POST", "/v1/executions", {"ids": ["exec_good_1", "../x", "a b", "exec_good_2"]})
        assert bad.status == 400, bad
        error = bad.json()["error"]
        assert error["code"] == "invalid_ids"
        assert error["invalid_ids"] == ["../x", "a b"]
        assert "../x" in error["message"], error
        assert rig.ls() == {}, "a refused POST tracked something"
        cli_bad = rig.cli("add", "exec_good_1", "no/slash")
        assert cli_bad.returncode == 2, cli_bad.stderr
        assert cli_bad.stderr.count("\n") == 1, cli_bad.stderr
        assert "no/slash" in cli_bad.stderr
        assert rig.ls() == {}

        before = metric_families(daemon)
        for name, kind in WANTED_FAMILIES.items():
            assert name in before, f"/metrics has no {name}: {sorted(before)}"
            assert before[name][0] == kind, (name, before[name][0])
        assert value(before, "execmon_api_requests_total") == 0
        assert value(before, "execmon_detection_delay_seconds_count") == 0

        completed = sim.create(6, duration_s=1.5, outcome="completed")
        failed = sim.create(2, duration_s=1.5, outcome="failed")
        ids = completed + failed
        assert rig.add(ids).startswith("8 added")
        wait_all_delivered(rig, daemon, len(ids), 20)
        assert_delivered_once(sim, read_jsonl(rig.out), ids)

        def moved() -> bool:  # sampled every few seconds: a sample may predate the last end
            now = metric_families(daemon)
            ended = {state: value(now, "execmon_executions_tracked", state=state) for state in ("completed", "failed")}
            return ended == {"completed": len(completed), "failed": len(failed)}

        assert wait_until(moved, 12, 0.5), metric_families(daemon)
        after = metric_families(daemon)
        polls = sim.stats()["requests_total"]
        assert value(after, "execmon_api_requests_total") == polls, (polls, after["execmon_api_requests"])
        assert value(after, "execmon_api_throttled_total") == 0
        assert value(after, "execmon_detection_delay_seconds_count") == len(ids)
        assert 0 < value(after, "execmon_detection_delay_seconds_sum") < 30 * len(ids)
        assert value(after, "execmon_sink_deliveries_total", result="ok") == len(ids)
        assert value(after, "execmon_executions_tracked", state="failed") == len(failed)
        assert value(after, "execmon_executions_tracked", state="running") == 0
        assert value(after, "execmon_budget_used") + value(after, "execmon_budget_free") == LIMIT
        assert value(after, "execmon_outbox_depth") == 0
        assert value(after, "execmon_dead_letters") == 0
        assert 0 <= value(after, "execmon_event_loop_lag_seconds") < 1.0
        assert after["execmon_event_loop_lag_seconds"][1], "the loop lag was never sampled"

        status = rig.cli("status", completed[0], "--json")
        assert status.returncode == 0, status.stderr
        view = json.loads(status.stdout)
        assert (view["execution_id"], view["state"], view["delivered"]) == (completed[0], "completed", True)
        assert rig.cli("rm", completed[0]).returncode == 0
        assert rig.cli("status", completed[0]).returncode == 1  # not tracked any more
        assert completed[0] not in rig.ls()
        stop(daemon)


# -- 4. SIGTERM ---------------------------------------------------------------------------------


def test_sigterm_under_heavy_polling_exits_0_in_the_grace_period_and_loses_nothing(tmp_path: Path) -> None:
    # Answers take longer than the grace period, and enough polls may be in flight to spend the whole
    # budget: at the SIGTERM a dozen polls wait for their answers, and some must be abandoned.
    # (The client counts a request against the window until its answer comes: with 1.5 s of latency
    # the budget allows about 30 / 4.5 s, so 200 executions keep this test well under a minute.)
    grace_s, latency_s = 0.5, 1.5
    with Sim.running(tmp_path, "--rate-limit", "30/3s", "--latency-ms", str(latency_s * 1000)) as sim:
        rig = make_rig(
            tmp_path,
            sim,
            api={"max_connections": 20},
            control={"grace_s": grace_s},
            polling={"max_in_flight": 20},
        )
        with rig.start() as daemon:
            ids: list[str] = []
            for duration in (3, 4, 5, 6):
                ids += sim.create(45, duration_s=duration, outcome="completed")
            failed = sim.create(20, duration_s=4, outcome="failed")
            ids += failed
            assert rig.add(ids).startswith("200 added")
            assert wait_until(lambda: sim.stats()["requests_total"] >= 50, 15), sim.stats()
            assert wait_for_lines(rig.out, 1, 10), "nothing delivered before the SIGTERM"
            in_flight = sim.stats()["requests_total"] - sum(sim.stats()["responses"].values())
            daemon.signal(signal.SIGTERM)
            asked = time.monotonic()
            rc = daemon.wait(grace_s + 10)
            took = time.monotonic() - asked
            assert rc == 0, daemon.stderr()[-2000:]
            assert took < grace_s + 2.0, f"exit {took:.1f} s after SIGTERM, grace {grace_s} s"
            assert "Traceback" not in daemon.stderr()
            assert any(e.get("event") == "stop requested" for e in daemon.log_lines())
        assert in_flight >= 5, f"only {in_flight} polls in flight at the SIGTERM: the test proves little"
        first = count_lines(rig.out)
        by_id(read_jsonl(rig.out))
        assert first < len(ids), "everything was delivered before the SIGTERM: the test proves nothing"
        spent = sim.stats()["requests_total"]
        time.sleep(0.5)
        assert sim.stats()["requests_total"] == spent, "requests after the daemon exited"

        with rig.start() as daemon:
            wait_all_delivered(rig, daemon, len(ids), 50)
            assert_delivered_once(sim, read_jsonl(rig.out), ids)
            assert {r["execution_id"] for r in read_jsonl(rig.out) if r["outcome"] == "failed"} == set(failed)
            sim.assert_budget_held(LIMIT)
            stop(daemon)


# -- 5. bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (('rate_limit = "30/3s"', 'rate_limit = "lots"'), "rate_limit"),
        (("", "[polling]\nmax_inflight = 3\n"), "max_inflight"),
        (("listen = ", 'listen = "nowhere"\n#'), "listen"),
        (("[state]", "[state]\nfsync = true"), "fsync"),
        # Checked by the sink and by the engine, yet still before anything is bound, logged or opened.
        (('type = "jsonl"', 'type = "jsonl"\nretries = 3'), "retries"),
        (('api_key_env = "EXECMON_API_KEY"', 'api_key_env = "EXECMON_NO_SUCH_KEY"'), "EXECMON_NO_SUCH_KEY"),
    ],
)
def test_a_config_that_fails_validation_exits_2_with_one_line(rig: Rig, edit: tuple[str, str], says: str) -> None:
    text = rig.config.read_text()
    old, new = edit
    rig.config.write_text(text.replace(old, new, 1) if old else text + new)
    assert rig.config.read_text() != text
    result = run_cli("run", "--config", str(rig.config), timeout_s=20)
    assert not rig.state.exists(), "a bad config created the state file"
    message = assert_one_line_exit_2(result)
    assert says in message
    assert "invalid TOML" not in message, message


def test_a_corrupt_state_file_is_refused_and_left_untouched(rig: Rig) -> None:
    garbage = b"this is not SQLite\x00\xff" * 2000
    rig.state.write_bytes(garbage)
    result = run_cli("run", "--config", str(rig.config), timeout_s=20)
    message = assert_error_exit_2(result)
    assert str(rig.state) in message, message
    assert "not a usable execmon state file" in message, message
    assert rig.state.read_bytes() == garbage
    with socket.socket() as sock:  # the control port was let go
        sock.bind(("127.0.0.1", rig.port))


def test_a_state_file_from_a_newer_schema_is_refused(rig: Rig, sim: Sim) -> None:
    ids = sim.create(2, duration_s=60)
    with rig.start() as daemon:
        rig.add(ids)
        stop(daemon)
    conn = sqlite3.connect(rig.state)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    before = rig.state.read_bytes()
    result = run_cli("run", "--config", str(rig.config), timeout_s=20)
    message = assert_error_exit_2(result)
    assert "newer execmon (schema 99" in message, message
    assert rig.state.read_bytes() == before


def test_a_busy_control_port_exits_2_with_one_line(rig: Rig) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", rig.port))
        busy.listen()
        result = run_cli("run", "--config", str(rig.config), timeout_s=20)
    message = assert_one_line_exit_2(result)
    assert f"127.0.0.1:{rig.port}" in message, message
    assert "in use" in message, message
    assert not rig.state.exists(), "the state was opened before the port was bound"


def test_a_huge_request_body_gets_413_and_the_daemon_goes_on(rig: Rig, sim: Sim) -> None:
    with rig.start() as daemon:
        huge = json.dumps({"ids": [f"exec_{i:07d}" for i in range(150_000)]}).encode()
        assert len(huge) > 2 * 1_048_576
        answer = daemon.api("POST", "/v1/executions", data=huge)
        assert answer.status == 413, answer
        assert answer.json()["error"]["code"] == "body_too_large"
        assert daemon.running()
        assert status_of(daemon.health()) == 200
        ids = sim.create(1, duration_s=1)
        assert daemon.api("POST", "/v1/executions", {"ids": ids}).status == 201
        assert sorted(rig.ls()) == ids
        stop(daemon)


# -- 6. scale -----------------------------------------------------------------------------------


def test_ls_answers_in_under_a_second_with_ten_thousand_tracked(tmp_path: Path, sim: Sim) -> None:
    rig = make_rig(tmp_path, sim, rate="30/60s")
    ids = [f"exec_ghost_{i:05d}" for i in range(10_000)]  # the simulator never heard of them
    with rig.start() as daemon:
        answer = daemon.api("POST", "/v1/executions", {"ids": ids})
        assert answer.status == 201, answer
        assert len(answer.json()["added"]) == len(ids)
        timings = []
        for args in (("ls",), ("ls", "--json")):
            started = time.monotonic()
            result = rig.cli(*args)
            timings.append(time.monotonic() - started)
            assert result.returncode == 0, result.stderr
        assert max(timings) < 1.0, f"execmon ls took {timings[0]:.2f} s, ls --json {timings[1]:.2f} s"
        table = rig.cli("ls").stdout.splitlines()
        assert len(table) == 1 + len(ids) + 1  # header, rows, summary
        assert table[-1].startswith("10000 executions"), table[-1]
        listing = rig.ls()
        assert sorted(listing) == ids
        assert sim.stats()["requests_total"] <= LIMIT
        stop(daemon)


def test_the_token_comes_from_the_environment_of_each_command(rig: Rig) -> None:
    """The client commands read the token from the same place as the daemon: a wrong one is one line, exit 2."""
    with rig.start() as daemon:
        result = run_cli("ls", "--config", str(rig.config), env=daemon_env({"EXECMON_CONTROL_TOKEN": "nope"}))
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert "token was rejected" in result.stderr, result.stderr
        assert CONTROL_TOKEN not in result.stderr
        stop(daemon)

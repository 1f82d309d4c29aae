"""`execmon watch` end to end: real processes, real time, against `execmon simulate`.

Black-box: only the CLI, exit codes, files and the simulator's ground truth are looked at.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import (
    API_KEY,
    RATE,
    Sim,
    WatchProc,
    WatchResult,
    assert_delivered_once,
    by_id,
    iso_seconds,
    read_jsonl,
    sim_args,
    wait_until,
    watch,
)

pytestmark = pytest.mark.slow

MAX_IN_FLIGHT = 4  # config default [polling] max_in_flight


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


def assert_one_line_error(result: WatchResult) -> None:
    assert result.rc == 2, result
    assert result.stdout == "", result
    assert "Traceback" not in result.stderr, result
    assert result.stderr.count("\n") == 1, result


# -- the budget, in real time ------------------------------------------------------------------


def test_hundred_executions_in_real_time_keep_the_budget(sim: Sim, tmp_path: Path) -> None:
    ids: list[str] = []
    for duration in (10, 11, 12, 13, 14, 15):
        ids += sim.create(17 if duration < 15 else 15, duration_s=duration, outcome="completed")
    assert len(ids) == 100
    out = tmp_path / "out.jsonl"
    result = watch([*sim_args(sim), "-", "--sink", f"jsonl:{out}", "--quiet"], tmp=tmp_path, ids=ids, timeout_s=50)
    assert result.rc == 0, result
    assert result.stdout == "", result  # the jsonl sink replaces stdout
    records = read_jsonl(out)
    assert len(records) == 100
    assert_delivered_once(sim, records, ids)
    assert {r["outcome"] for r in records} == {"completed"}
    stats = sim.assert_budget_held()
    assert stats["executions"]["completed"] == 100


# -- exit codes and what goes where ----------------------------------------------------------------


def test_all_completed_exits_0_stdout_only_records_stderr_one_line_per_change(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(5, duration_s=4, outcome="completed")
    result = watch([*sim_args(sim), *ids], tmp=tmp_path, timeout_s=30)
    assert result.rc == 0, result
    records = result.records()  # every stdout line is a JSON record
    assert_delivered_once(sim, records, ids)
    for record in records:
        assert record["kind"] == "execution"
        assert record["outcome"] == "completed"
        assert record["event_id"]
        assert record["progress"] == 100
        assert record["result"] is not None
    lines = result.log_lines()  # on a pipe: every stderr line is one JSON object
    truth = sim.truth()
    for execution_id in ids:
        mine = [line for line in lines if line.get("execution_id") == execution_id]
        states = [line["state"] for line in mine if "state" in line]
        assert states, f"no state line for {execution_id}: {result}"
        assert all(a != b for a, b in itertools.pairwise(states)), f"repeated state: {states}"
        assert truth[execution_id]["polls"] >= 2
        # running, completed and a final line at most, however many times it was polled
        assert len(mine) <= 3, f"{len(mine)} lines for {execution_id} ({truth[execution_id]['polls']} polls): {mine}"
    assert API_KEY not in result.stderr


def test_quiet_leaves_only_warnings_and_errors_on_stderr(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(3, duration_s=2, outcome="completed") + sim.create(1, duration_s=2, outcome="failed")
    result = watch([*sim_args(sim), "--quiet", *ids], tmp=tmp_path, timeout_s=30)
    assert result.rc == 1, result
    assert len(result.records()) == 4
    for line in result.log_lines():
        assert line.get("level") in {"warning", "error", "critical"}, line


def test_one_failed_exits_1_with_the_error_in_its_record(sim: Sim, tmp_path: Path) -> None:
    ok = sim.create(3, duration_s=2, outcome="completed")
    bad = sim.create(1, duration_s=2, outcome="failed")
    result = watch([*sim_args(sim), "--quiet", *ok, *bad], tmp=tmp_path, timeout_s=30)
    assert result.rc == 1, result
    records = by_id(result.records())
    assert_delivered_once(sim, result.records(), ok + bad)
    failed = records[bad[0]]
    assert failed["outcome"] == "failed"
    assert failed["error"]["code"]
    assert failed["finished_at"]


@pytest.mark.parametrize("how", ["wrong-key", "revoked-mid-watch"])
def test_rejected_key_exits_3_and_stops_spending(tmp_path: Path, how: str) -> None:
    doomed = "sk_test_doomed_key_9137"
    keys = (API_KEY,) if how == "wrong-key" else (API_KEY, doomed)
    with Sim.running(tmp_path, "--rate-limit", RATE, api_keys=keys) as sim:
        ids = sim.create(10, duration_s=60, outcome="completed")
        with WatchProc(sim_args(sim, *ids), tmp=tmp_path, env={"EXECMON_API_KEY": doomed}) as proc:
            if how == "revoked-mid-watch":
                assert wait_until(lambda: sim.stats()["responses"]["200"] >= 10, 15)
                sim.revoke(doomed)
            result = proc.wait(20)
        assert result.rc == 3, result
        rejected = sim.stats()["responses"]["401"]
        assert 1 <= rejected <= MAX_IN_FLIGHT, f"{rejected} requests answered 401"
        assert doomed not in result.stderr + result.stdout
        assert "401" in result.stderr or "key" in result.stderr.lower(), result


@pytest.mark.parametrize("stdin_dash", [False, True])
def test_no_ids_is_a_usage_error(sim: Sim, tmp_path: Path, stdin_dash: bool) -> None:
    args = sim_args(sim, "-") if stdin_dash else sim_args(sim)
    result = watch(args, tmp=tmp_path, ids=["", "# only a comment"] if stdin_dash else None, timeout_s=20)
    assert_one_line_error(result)
    assert sim.stats()["requests_total"] == 0


def test_an_invalid_id_is_named_and_the_rest_are_watched(sim: Sim, tmp_path: Path) -> None:
    good = sim.create(2, duration_s=2, outcome="completed")
    invalid = "exec_bad.id"
    result = watch([*sim_args(sim), good[0], invalid, good[1]], tmp=tmp_path, timeout_s=30)
    assert invalid in result.stderr, result
    assert "Traceback" not in result.stderr
    assert_delivered_once(sim, result.records(), good)
    assert result.rc in {1, 2}, result  # not every ID given could be watched: not a success


def test_duplicate_ids_are_watched_once(sim: Sim, tmp_path: Path) -> None:
    a, b = sim.create(2, duration_s=2, outcome="completed")
    result = watch([*sim_args(sim), "-", a], tmp=tmp_path, ids=[a, b, a, a], timeout_s=30)
    assert result.rc == 0, result
    assert_delivered_once(sim, result.records(), [a, b])


def test_fail_fast_exits_1_soon_after_the_first_failure(sim: Sim, tmp_path: Path) -> None:
    slow = sim.create(5, duration_s=120, outcome="completed")
    bad = sim.create(1, duration_s=2, outcome="failed")
    result = watch([*sim_args(sim), "--fail-fast", *slow, *bad], tmp=tmp_path, timeout_s=40)
    assert result.rc == 1, result
    assert result.elapsed_s < 15, result
    records = by_id(result.records())
    assert records[bad[0]]["outcome"] == "failed"
    assert not set(records) & set(slow)  # they were still running


def test_timeout_gives_timed_out_records(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(3, duration_s=120, outcome="completed")
    result = watch([*sim_args(sim), "--timeout", "3", *ids], tmp=tmp_path, timeout_s=40)
    assert result.rc == 1, result
    records = by_id(result.records())
    assert sorted(records) == sorted(ids)
    assert {r["outcome"] for r in records.values()} == {"timed_out"}
    assert 3 <= result.elapsed_s < 15, result
    for record in records.values():
        waited = iso_seconds(record["observed_at"]) - iso_seconds(record["tracked_since"])
        assert 2.9 <= waited < 10, record


def test_an_execution_that_ended_before_the_watch_is_reported_at_once(sim: Sim, tmp_path: Path) -> None:
    failed = sim.create(1, duration_s=0.5, outcome="failed")
    completed = sim.create(1, duration_s=0.5, outcome="completed")
    time.sleep(1.0)
    result = watch([*sim_args(sim), *failed, *completed], tmp=tmp_path, timeout_s=30)
    assert result.rc == 1, result
    assert_delivered_once(sim, result.records(), failed + completed)
    truth = sim.truth()
    assert truth[failed[0]]["polls"] == 1
    assert truth[completed[0]]["polls"] == 1
    assert result.elapsed_s < 8, result


def test_an_unknown_id_becomes_not_found_after_confirmations(sim: Sim, tmp_path: Path) -> None:
    known = sim.create(1, duration_s=1, outcome="completed")
    missing = "exec_never_created_e2e"
    result = watch([*sim_args(sim), missing, *known], tmp=tmp_path, timeout_s=40)
    assert result.rc == 1, result
    records = by_id(result.records())
    assert records[known[0]]["outcome"] == "completed"
    lost = records[missing]
    assert lost["outcome"] == "not_found"
    span = iso_seconds(lost["observed_at"]) - iso_seconds(lost["tracked_since"])
    assert span >= 5, lost
    assert sim.stats()["responses"]["404"] >= 3


def test_a_bad_rate_limit_is_one_line_and_exit_2(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(1, duration_s=60, outcome="completed")
    result = watch(["--base-url", sim.url, "--rate-limit", "30 per minute", *ids], tmp=tmp_path, timeout_s=20)
    assert_one_line_error(result)
    assert "rate" in result.stderr.lower()
    assert sim.stats()["requests_total"] == 0


def test_an_unreachable_api_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once the socket is closed
    ids = ["exec_unreachable_1", "exec_unreachable_2"]
    args = ["--base-url", f"http://127.0.0.1:{port}", "--rate-limit", RATE, "--timeout", "4", *ids]
    result = watch(args, tmp=tmp_path, timeout_s=40)
    assert result.rc == 2, result
    assert "Traceback" not in result.stderr
    assert result.records() == []
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result
    assert f"cannot reach the API at 127.0.0.1:{port}" in lines[0], result
    assert "--base-url" in lines[0], result

"""The SQLite state file: tracking, terminal + outbox atomicity, crashes, locking, versions, groups."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.errors import StoreFault, UsageError
from monitor.records import Outcome, event_id, group_event_id
from monitor.state import outbox as outbox_module
from monitor.state.db import SCHEMA_VERSION
from monitor.state.store import DeliveryState, StateError, Store, TrackRequest


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "state.db")
    yield s
    s.close()


def rec(execution_id: str, outcome: Outcome = Outcome.COMPLETED, group: str | None = None) -> dict[str, Any]:
    return {
        "event_id": event_id(execution_id, outcome),
        "kind": "execution",
        "execution_id": execution_id,
        "outcome": outcome.value,
        "finished_at": f"2025-11-11T10:00:{len(execution_id) % 60:02d}Z",
        "observed_at": "2025-11-11T10:01:00Z",
        "group": group,
    }


def track(store: Store, *ids: str, group: str | None = None) -> list[str]:
    return store.track_many(TrackRequest(i, tracked_since=1000.0, group=group) for i in ids)


def test_track_many_adds_only_new_ids_and_keeps_the_schedule(store: Store) -> None:
    assert track(store, "exec_a", "exec_b") == ["exec_a", "exec_b"]
    store.save_poll("exec_a", {"next_due": 42.0}, {"status": "running", "progress": 5}, 3)
    again = store.track_many(
        [
            TrackRequest("exec_a", tracked_since=2000.0, schedule={"next_due": 1.0}),
            TrackRequest("exec_c", 2000.0),
        ]
    )
    assert again == ["exec_c"]
    row = store.get("exec_a")
    assert row is not None
    assert row.schedule == {"next_due": 42.0}
    assert row.last_status == {"status": "running", "progress": 5}
    assert (row.polls, row.tracked_since, row.terminal) == (3, 1000.0, False)
    assert [r.execution_id for r in store.load_active()] == ["exec_a", "exec_b", "exec_c"]


def test_ten_thousand_ids_are_tracked_in_well_under_a_second(store: Store) -> None:
    ids = [f"exec_{n:06d}" for n in range(10_000)]
    started = time.perf_counter()
    added = store.track_many(TrackRequest(i, tracked_since=1.0, group="big", labels={"n": i}) for i in ids)
    took = time.perf_counter() - started
    assert len(added) == 10_000
    assert took < 0.8, f"track_many(10,000) took {took:.2f} s"
    assert store.count_executions("active") == 10_000


def test_finish_marks_terminal_and_enqueues_per_sink_once(store: Store) -> None:
    track(store, "exec_a")
    result = store.finish("exec_a", Outcome.FAILED, rec("exec_a", Outcome.FAILED), ["jsonl", "webhook"])
    assert (result.newly_terminal, result.enqueued) == (True, 2)
    row = store.get("exec_a")
    assert row is not None
    assert row.outcome is Outcome.FAILED
    assert row.record is not None
    assert row.record["outcome"] == "failed"
    assert store.pending_count() == 2
    assert [k[1] for k in store.pending_keys("jsonl")] == [event_id("exec_a", Outcome.FAILED)]
    # Idempotent: a second finish (say, a duplicate poll answer) changes nothing.
    again = store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl", "stdout"])
    assert again.newly_terminal is False
    assert store.pending_count() == 2
    assert store.results() == {"exec_a": Outcome.FAILED}
    assert store.finish("exec_unknown", Outcome.COMPLETED, rec("exec_unknown"), ["jsonl"]).newly_terminal is False


def test_terminal_state_and_outbox_rows_commit_together(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    track(store, "exec_a")

    def broken_enqueue(*args: object, **kwargs: object) -> int:
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr("monitor.state.store.enqueue", broken_enqueue)
    with pytest.raises(StoreFault, match=r"state file .*state\.db: disk I/O error \(simulated\)"):
        store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl"])
    row = store.get("exec_a")
    assert row is not None
    assert row.terminal is False, "terminal without its outbox rows would lose the result"
    monkeypatch.setattr("monitor.state.store.enqueue", outbox_module.enqueue)
    assert store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl"]).newly_terminal
    assert store.pending_count("jsonl") == 1


def test_outbox_failures_backoff_dead_letters_and_retry(store: Store) -> None:
    track(store, "exec_a", "exec_b")
    store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["hook"])
    store.finish("exec_b", Outcome.COMPLETED, rec("exec_b"), ["hook"])
    ev_a, ev_b = event_id("exec_a", Outcome.COMPLETED), event_id("exec_b", Outcome.COMPLETED)
    assert [k[1] for k in store.pending_keys("hook")] == [ev_a, ev_b]
    assert store.mark_failed(ev_a, "hook", "HTTP 500", next_attempt_at=500.0) == 1
    assert store.mark_failed(ev_a, "hook", "HTTP 503", next_attempt_at=600.0) == 2
    assert [(k[1], k[2]) for k in store.pending_keys("hook")] == [(ev_a, 600.0), (ev_b, 0.0)]
    first = store.pending_keys("hook")[0][0]
    assert [k[1] for k in store.pending_keys("hook", after_seq=first)] == [ev_b]
    failed = store.get_delivery(ev_a, "hook")
    assert failed is not None
    assert (failed.attempts, failed.last_error, failed.record["execution_id"]) == (2, "HTTP 503", "exec_a")
    assert store.mark_delivered(ev_b, "hook") is True
    assert store.mark_delivered(ev_b, "hook") is False  # already settled
    assert store.mark_dead(ev_a, "hook", "HTTP 404 (not retried)") is True
    dead = store.dead_letters()
    assert [(d.event_id, d.state, d.attempts, d.last_error) for d in dead] == [
        (ev_a, DeliveryState.DEAD, 3, "HTTP 404 (not retried)")
    ]
    assert (store.pending_count(), store.dead_count()) == (0, 1)
    assert store.retry_dead(ev_a) == 1
    row = store.get_delivery(ev_a, "hook")
    assert row is not None
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)
    delivered = store.get_delivery(ev_b, "hook")
    assert delivered is not None
    assert delivered.state is DeliveryState.DELIVERED
    assert store.undelivered_among(["exec_a", "exec_b", "exec_unknown"]) == {"exec_a"}
    assert store.undelivered_among([]) == set()


def test_group_digest_once_after_the_last_member(store: Store) -> None:
    store.set_group_sinks(["chat"])
    track(store, "exec_1", "exec_2", "exec_3", group="nightly")
    track(store, "exec_other")
    assert store.finish("exec_1", Outcome.COMPLETED, rec("exec_1", group="nightly"), ["jsonl"]).group_record is None
    assert (
        store.finish("exec_2", Outcome.FAILED, rec("exec_2", Outcome.FAILED, "nightly"), ["jsonl"]).group_record is None
    )
    last = store.finish("exec_3", Outcome.CANCELLED, rec("exec_3", Outcome.CANCELLED, "nightly"), ["jsonl"])
    digest = last.group_record
    assert digest is not None
    batch = digest["batch"]
    assert batch.startswith("b_")
    assert digest["event_id"] == group_event_id("nightly", batch)
    assert (digest["kind"], digest["group"], digest["total"]) == ("group", "nightly", 3)
    assert digest["outcomes"] == {"cancelled": 1, "completed": 1, "failed": 1}
    assert digest["failed_ids"] == ["exec_2", "exec_3"]
    assert store.pending_keys("chat")[0][1] == group_event_id("nightly", batch)
    assert store.pending_count("chat") == 1
    # Finishing the unrelated ID or repeating a member does not produce a second digest.
    store.finish("exec_3", Outcome.CANCELLED, rec("exec_3", Outcome.CANCELLED, "nightly"), ["jsonl"])
    store.finish("exec_other", Outcome.COMPLETED, rec("exec_other"), ["jsonl"])
    assert store.pending_count("chat") == 1


def test_untracking_the_last_running_member_completes_the_group(store: Store) -> None:
    store.set_group_sinks(["chat"])
    track(store, "exec_1", "exec_2", group="g")
    store.finish("exec_1", Outcome.COMPLETED, rec("exec_1", group="g"), [])
    assert store.pending_count("chat") == 0
    assert store.untrack("exec_2") is True
    assert store.untrack("exec_2") is False
    [(_, digest_id, _)] = store.pending_keys("chat")
    digest = store.get_delivery(digest_id, "chat")
    assert digest is not None
    assert digest_id == group_event_id("g", digest.record["batch"])
    assert (digest.record["total"], digest.record["failed_ids"]) == (1, [])


def test_list_filters_results_and_status_filters(store: Store) -> None:
    track(store, "exec_a", "exec_b", "exec_c")
    store.finish("exec_b", Outcome.NOT_FOUND, rec("exec_b", Outcome.NOT_FOUND), [])
    assert [r.execution_id for r in store.list_executions("active")] == ["exec_a", "exec_c"]
    assert [r.execution_id for r in store.list_executions("pending")] == ["exec_a", "exec_c"]
    store.save_poll("exec_c", None, {"status": "running", "progress": 5}, 1)
    assert [r.execution_id for r in store.list_executions("running")] == ["exec_c"]
    assert [r.execution_id for r in store.list_executions("pending")] == ["exec_a"]
    assert [r.execution_id for r in store.list_executions("not_found")] == ["exec_b"]
    assert [r.execution_id for r in store.list_executions(None, limit=1, offset=1)] == ["exec_b"]
    assert store.count_executions("terminal") == 1
    assert store.results(["exec_a", "exec_b"]) == {"exec_b": Outcome.NOT_FOUND}
    with pytest.raises(UsageError, match="unknown status filter 'done'"):
        store.list_executions("done")


def test_budget_history(store: Store) -> None:
    first = store.record_request(100.0)
    second = store.record_request(101.0)
    store.complete_request(first, 100.4)
    assert store.recent_requests(100.0) == [(100.4, True), (101.0, False)]
    assert store.recent_requests(100.5) == [(101.0, False)]
    assert second > first


def test_history_is_pruned(store: Store) -> None:
    for n in range(200):
        store.record_request(float(n * 60))  # one per minute: most are far older than an hour
    assert len(store.recent_requests(0.0)) < 130


def test_second_opener_is_refused_with_the_owner_pid(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with (
        Store.open(path),
        pytest.raises(StateError, match=rf"in use by another execmon \(pid {os.getpid()}\)"),
    ):
        Store.open(path)
    with Store.open(path) as again:  # released on close
        assert track(again, "exec_a") == ["exec_a"]


def test_read_only_open_beside_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as writer:
        track(writer, "exec_a")
        with Store.open(path, read_only=True) as reader:
            assert [r.execution_id for r in reader.load_active()] == ["exec_a"]


def test_corrupt_or_foreign_files_are_refused_and_left_untouched(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    content = b"this is not a database, it is a text file that happens to be long enough\n" * 40
    garbage.write_bytes(content)
    with pytest.raises(StateError, match=r"not a usable execmon state file.*move it aside"):
        Store.open(garbage)
    assert garbage.read_bytes() == content
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StateError, match="not an execmon state file"):
        Store.open(foreign)
    with pytest.raises(StateError, match=r"directory .* does not exist"):
        Store.open(tmp_path / "missing" / "state.db")


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store.open(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(StateError, match=r"newer execmon .*upgrade execmon"):
        Store.open(path)


CRASHING_WRITER = textwrap.dedent(
    """
    import sys, time
    from monitor.records import Outcome
    from monitor.state.store import Store, TrackRequest
    store = Store.open(sys.argv[1])
    store.track_many(TrackRequest(f"exec_{n}", tracked_since=1.0) for n in range(5))
    for n in range(3):
        record = {"event_id": f"ev_{n}", "kind": "execution", "execution_id": f"exec_{n}", "outcome": "completed"}
        store.finish(f"exec_{n}", Outcome.COMPLETED, record, ["jsonl", "webhook"])
    store.mark_delivered("ev_0", "jsonl")
    store.complete_request(store.record_request(121.0), 121.5)
    store.save_poll("exec_3", {"next_due": 9.0}, {"status": "running"}, 1)
    store.flush_polls()
    store.complete_request(store.record_request(123.0), 123.5)  # answered, but not flushed
    store.save_poll("exec_4", {"next_due": 9.0}, {"status": "running"}, 1)  # not flushed either
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_killed_process_loses_nothing_and_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            with pytest.raises(StateError, match=f"pid {proc.pid}"):
                Store.open(path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    with Store.open(path) as store:
        assert store.pending_count("jsonl") == 2
        assert store.pending_count("webhook") == 3
        assert [k[1] for k in store.pending_keys("jsonl")] == ["ev_1", "ev_2"]
        assert [(r.execution_id, r.polls) for r in store.load_active()] == [("exec_3", 1), ("exec_4", 0)]
        # Every request sent is remembered; an answer not flushed yet counts as none (the safe side).
        assert store.recent_requests(0.0) == [(121.5, True), (123.0, False)]


def test_each_use_of_a_group_name_is_its_own_batch_with_its_own_digest(store: Store) -> None:
    store.set_group_sinks(["chat"])
    track(store, "night1_a", "night1_b", group="nightly")  # one call: one batch
    track(store, "night2_a", group="nightly")  # the same name the next night: a new batch
    first = store.finish("night1_a", Outcome.COMPLETED, rec("night1_a", group="nightly"), [])
    assert first.group_record is None  # night1_b still runs
    second = store.finish("night2_a", Outcome.COMPLETED, rec("night2_a", group="nightly"), [])
    third = store.finish("night1_b", Outcome.FAILED, rec("night1_b", Outcome.FAILED, "nightly"), [])
    assert second.group_record is not None
    assert third.group_record is not None
    digests = [second.group_record, third.group_record]
    assert [d["total"] for d in digests] == [1, 2]
    assert digests[0]["batch"] != digests[1]["batch"]
    assert digests[0]["event_id"] != digests[1]["event_id"]
    assert {d["group"] for d in digests} == {"nightly"}
    assert store.pending_count("chat") == 2


def test_a_batch_given_by_the_caller_spans_several_calls(store: Store) -> None:
    store.set_group_sinks(["chat"])
    for execution_id in ("c_1", "c_2"):  # e.g. `execmon add` splitting one call into chunks
        store.track_many([TrackRequest(execution_id, tracked_since=1.0, group="g", batch="b_one")])
    store.finish("c_1", Outcome.COMPLETED, rec("c_1", group="g"), [])
    done = store.finish("c_2", Outcome.COMPLETED, rec("c_2", group="g"), [])
    assert done.group_record is not None
    assert (done.group_record["batch"], done.group_record["total"]) == ("b_one", 2)


_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE executions (execution_id TEXT PRIMARY KEY, tracked_since REAL NOT NULL, deadline_at REAL, grp TEXT,
  labels_json TEXT NOT NULL DEFAULT '{}', schedule_json TEXT, last_status_json TEXT,
  polls INTEGER NOT NULL DEFAULT 0, terminal_outcome TEXT, terminal_at REAL, record_json TEXT);
CREATE INDEX executions_by_group ON executions (grp) WHERE grp IS NOT NULL;
CREATE INDEX executions_by_outcome ON executions (terminal_outcome);
CREATE TABLE groups (name TEXT PRIMARY KEY, expected_total INTEGER, members INTEGER NOT NULL DEFAULT 0,
  terminal INTEGER NOT NULL DEFAULT 0, digest_at REAL);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, sink TEXT NOT NULL,
  kind TEXT NOT NULL, execution_id TEXT, record_json TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at REAL NOT NULL, state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
  last_error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, UNIQUE (event_id, sink));
CREATE INDEX outbox_by_sink_state ON outbox (sink, state, next_attempt_at);
CREATE TABLE budget (id INTEGER PRIMARY KEY AUTOINCREMENT, stamp REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0);
CREATE INDEX budget_by_stamp ON budget (stamp);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO executions (execution_id, tracked_since, grp) VALUES ('old_a', 1, 'nightly'), ('old_b', 1, 'nightly');
INSERT INTO groups (name, members) VALUES ('nightly', 2);
"""


def test_a_schema_1_file_is_migrated_and_its_group_in_progress_still_gets_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_V1)
    conn.close()
    with Store.open(path) as store:
        store.set_group_sinks(["chat"])
        store.finish("old_a", Outcome.COMPLETED, rec("old_a", group="nightly"), [])
        done = store.finish("old_b", Outcome.COMPLETED, rec("old_b", group="nightly"), [])
        assert done.group_record is not None
        assert (done.group_record["batch"], done.group_record["total"]) == ("legacy:nightly", 2)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    conn.close()


def _shape(path: Path) -> dict[str, object]:
    """Each table's columns (in any order: a migration appends) and each index's columns and WHERE."""
    shape: dict[str, object] = {}
    with sqlite3.connect(path) as conn:
        for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite%'"):
            if kind == "table":
                shape[name] = sorted(tuple(column[1:]) for column in conn.execute(f"PRAGMA table_info({name})"))
            else:
                columns = [column[2] for column in conn.execute(f"PRAGMA index_info({name})")]
                shape[name] = (columns, " ".join(sql.partition(" WHERE ")[2].split()))
    conn.close()
    return shape


def test_a_migrated_file_has_the_schema_of_a_new_one(tmp_path: Path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    with sqlite3.connect(old) as conn:
        conn.executescript(_SCHEMA_V1)
    conn.close()
    Store.open(old).close()
    Store.open(new).close()
    assert _shape(old) == _shape(new)
    assert "outbox_by_execution" in _shape(new)


def test_learned_run_times_outlive_the_process(tmp_path: Path) -> None:
    path = tmp_path / "learning.db"
    with Store.open(path) as first:
        assert first.load_learning() is None
        first.save_learning('{"runs":[]}')
        first.save_learning('{"runs":[{"kind":"etl","n":3}]}')
    with Store.open(path) as second:
        assert second.load_learning() == '{"runs":[{"kind":"etl","n":3}]}'

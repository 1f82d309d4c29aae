"""The state store under real faults: a file that cannot grow (RLIMIT_FSIZE), a read-only file, a
damaged file; batched poll bookkeeping; the in-memory store; the StateStore protocol."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from monitor.errors import StoreFault
from monitor.records import Outcome, event_id
from monitor.state.protocol import StateStore
from monitor.state.store import StateError, Store, TrackRequest


def rec(execution_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id(execution_id, Outcome.COMPLETED),
        "execution_id": execution_id,
        "outcome": "completed",
        "observed_at": "2025-11-11T10:01:00Z",
    }


# The child lowers its own file-size limit: Python ignores SIGXFSZ, so a write past it fails with
# EFBIG inside sqlite, as a full disk would. Every attempt prints what it raised.
FILE_CANNOT_GROW = textwrap.dedent(
    """
    import json, os, resource, sys
    from monitor.records import Outcome
    from monitor.state.store import Store, TrackRequest

    path = sys.argv[1]
    seen = {}

    def attempt(name, call):
        try:
            seen[name] = ["ok", call()]
        except Exception as exc:
            seen[name] = [type(exc).__name__, str(exc)]

    def finish(i):
        record = {"event_id": "ev_" + i, "execution_id": i, "outcome": "completed"}
        return store.finish(i, Outcome.COMPLETED, record, ["jsonl"]).newly_terminal

    store = Store.open(path)
    store.track_many(TrackRequest(f"exec_{n}", tracked_since=1.0) for n in range(3))
    finish("exec_0")
    store.save_poll("exec_1", {"next_due": 1.0}, {"progress": 10}, 1)
    store.record_request(100.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    size = max(os.path.getsize(path + suffix) for suffix in ("", "-wal"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    attempt("track", lambda: store.track_many([TrackRequest("exec_new", tracked_since=2.0)]))
    attempt("finish", lambda: finish("exec_1"))
    attempt("record_request", lambda: store.record_request(101.0))
    attempt("probe", store.probe)
    store.save_poll("exec_2", {"next_due": 2.0}, {"progress": 50}, 7)
    attempt("flush", store.flush_polls)
    attempt("read", lambda: [store.get("exec_1").outcome, store.get("exec_2").polls])

    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    attempt("probe_after", store.probe)
    attempt("flush_after", store.flush_polls)
    attempt("finish_after", lambda: finish("exec_1"))
    store.close()
    print(json.dumps(seen))
    """
)


def test_writes_fail_as_faults_while_the_file_cannot_grow_then_resume_losing_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    child = subprocess.run(
        [sys.executable, "-c", FILE_CANNOT_GROW, str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    for name in ("track", "finish", "record_request", "probe", "flush"):
        kind, message = seen[name]
        assert kind == "StoreFault", f"{name}: {kind}: {message}"  # never StateError ("not usable")
        assert message.startswith(f"state file {path}: disk I/O error"), message
    assert seen["read"] == ["ok", [None, 0]], "reads go on from the disk while writes fail"
    assert seen["probe_after"] == ["ok", None]
    assert seen["flush_after"] == ["ok", 2], "both buffered polls (exec_1, exec_2) survived the failed flush"
    assert seen["finish_after"] == ["ok", True]
    with Store.open(path) as store:
        assert store.results() == {"exec_0": Outcome.COMPLETED, "exec_1": Outcome.COMPLETED}
        assert [k[1] for k in store.pending_keys("jsonl")] == ["ev_exec_0", "ev_exec_1"]
        row = store.get("exec_2")
        assert row is not None
        assert (row.polls, row.schedule, row.last_status) == (7, {"next_due": 2.0}, {"progress": 50})
        assert store.get("exec_new") is None, "the failed track left nothing behind"
        assert store.recent_requests(0.0) == [(100.0, False)]


def test_a_read_only_store_faults_on_write_and_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as writer:
        writer.track_many([TrackRequest("exec_a", tracked_since=1.0)])
    with Store.open(path, read_only=True) as reader:
        with pytest.raises(StoreFault, match=r"state file .*: attempt to write a readonly database"):
            reader.probe()
        assert [r.execution_id for r in reader.load_active()] == ["exec_a"]


def test_a_damaged_page_is_refused_at_open_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as store:
        store.track_many(TrackRequest(f"exec_{n:05d}", tracked_since=1.0, labels={"n": "x" * 50}) for n in range(2000))
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")  # the page size, from the file header
    assert len(data) > 30 * page
    data[20 * page + 1 : 20 * page + 3] = b"\x00\x05"  # page 21's first free block: inside its header
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match=r"not a usable execmon state file \(damaged: .*Page 21.*move it aside"):
        Store.open(path)
    assert path.read_bytes() == bytes(data)


def test_garbage_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"\x00garbage\xff" * 1000)
    with pytest.raises(StateError, match="not a usable execmon state file"):
        Store.open(path)


def test_polls_are_written_in_one_flush_and_only_the_latest_per_id(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as store, Store.open(path, read_only=True) as other:
        store.track_many(TrackRequest(i, tracked_since=1.0) for i in ("exec_a", "exec_b", "exec_c"))
        for polls in (1, 2, 3):
            store.save_poll("exec_a", {"n": polls}, {"progress": polls}, polls)
        store.save_poll("exec_b", None, None, 1)
        store.complete_request(store.record_request(10.0), 10.5)
        assert other.count_executions("running") == 0, "nothing written before the flush"
        assert store.flush_polls() == 3  # two executions and one answered request
        assert store.flush_polls() == 0
        row = other.get("exec_a")
        assert row is not None
        assert (row.polls, row.schedule, row.last_status) == (3, {"n": 3}, {"progress": 3})
        assert [r.execution_id for r in other.list_executions("running")] == ["exec_a", "exec_b"]
        assert other.recent_requests(0.0) == [(10.5, True)]
        # finish and untrack drop what is buffered for their ID; close flushes the rest.
        store.save_poll("exec_a", {"n": 4}, None, 4)
        store.save_poll("exec_b", {"n": 4}, None, 4)
        store.save_poll("exec_c", {"n": 1}, None, 1)
        store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), [])
        assert store.untrack("exec_b") is True
        assert store.flush_polls() == 1
        store.save_poll("exec_c", {"n": 2}, None, 2)
    with Store.open(path, read_only=True) as reader:
        row = reader.get("exec_c")
        assert row is not None
        assert (row.polls, row.schedule) == (2, {"n": 2})


def test_reads_see_buffered_polls(tmp_path: Path) -> None:
    with Store.open(tmp_path / "state.db") as store:
        store.track_many([TrackRequest("exec_a", tracked_since=1.0)])
        store.save_poll("exec_a", {"n": 1}, {"progress": 5}, 1)
        row = store.get("exec_a")
        assert row is not None
        assert row.polls == 1
        assert store.count_executions("pending") == 0


def test_probe_writes_a_stamp(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as store:
        store.probe()
        store.probe()  # an upsert: one row however often it runs
    conn = sqlite3.connect(path)
    try:
        [(value,)] = conn.execute("SELECT value FROM meta WHERE key = 'probe'").fetchall()
    finally:
        conn.close()
    assert float(value) > 0


def test_the_in_memory_store_keeps_everything_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store.open(None)
    other = Store.open(None)
    try:
        assert store.track_many(TrackRequest(i, tracked_since=1.0, group="g") for i in ("exec_a", "exec_b")) == [
            "exec_a",
            "exec_b",
        ]
        store.set_group_sinks(["chat"])
        store.save_poll("exec_b", {"n": 1}, {"progress": 5}, 1)
        store.probe()
        store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl"])
        store.finish("exec_b", Outcome.COMPLETED, rec("exec_b"), ["jsonl"])
        assert store.results() == {"exec_a": Outcome.COMPLETED, "exec_b": Outcome.COMPLETED}
        assert (store.pending_count("jsonl"), store.pending_count("chat")) == (2, 1)
        assert other.count_executions() == 0, "each in-memory store is its own"
    finally:
        store.close()
        other.close()
    assert list(tmp_path.iterdir()) == [], "no state file and no lock file"
    with pytest.raises(ValueError, match="read-only"):
        Store.open(None, read_only=True)


def test_the_sqlite_store_follows_the_protocol() -> None:
    store: StateStore = Store.open(None)  # mypy checks that Store satisfies StateStore
    store.close()

"""The jsonl sink: whole lines, one per event_id (also across re-opens), torn tails tolerated."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from monitor.config import SinkConfig
from monitor.errors import UsageError
from monitor.sinks.jsonl import JsonlSink


def config(**options: Any) -> SinkConfig:
    return SinkConfig(type="jsonl", index=2, source="test.toml", options=options)


def record(n: int, outcome: str = "completed") -> dict[str, Any]:
    return {"event_id": f"ev_{n}", "kind": "execution", "execution_id": f"exec_{n}", "outcome": outcome}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def opened(path: Path) -> JsonlSink:
    sink = JsonlSink.from_options({"path": str(path)}, config())
    await sink.open()
    return sink


async def test_a_redelivery_writes_no_second_line_even_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = await opened(path)
    await sink.send(record(1))
    await sink.send(record(1))
    await sink.send(record(2, "failed"))
    await sink.close()
    again = await opened(path)
    assert again.known_event_ids == 2
    await again.send(record(2, "failed"))
    await again.send(record(3))
    await again.close()
    assert [r["event_id"] for r in lines(path)] == ["ev_1", "ev_2", "ev_3"]
    assert path.read_bytes().endswith(b"\n")
    assert lines(path)[1] == record(2, "failed")  # the record itself, keys in contract order


async def test_a_torn_last_line_is_skipped_and_the_next_line_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    whole = json.dumps(record(1)) + "\n"
    path.write_text(whole + '{"event_id": "ev_2", "kind": "exec')  # a crash mid-line (power loss)
    sink = await opened(path)
    assert sink.known_event_ids == 1
    await sink.send(record(1))  # held already: nothing written
    await sink.send(record(2))  # the torn one was never complete: written again, on its own line
    await sink.close()
    raw = path.read_text().splitlines()
    assert raw[0] == whole.strip()
    assert raw[1].startswith('{"event_id": "ev_2", "kind": "exec')
    assert json.loads(raw[2]) == record(2)
    assert len(raw) == 3


async def test_concurrent_sends_share_fsyncs_and_every_line_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = await opened(path)
    big = "x" * 100_000  # a line far larger than a pipe buffer still goes out in one write
    await asyncio.gather(*(sink.send({**record(n), "result": big if n % 7 == 0 else n}) for n in range(60)))
    await asyncio.gather(*(sink.send(record(n)) for n in range(60)))  # all duplicates
    await sink.close()
    got = lines(path)
    assert sorted(r["event_id"] for r in got) == sorted(f"ev_{n}" for n in range(60))


async def test_cancelled_sends_leave_no_duplicate_and_no_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = await opened(path)
    for n in range(20):
        task = asyncio.create_task(sink.send(record(n)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.send(record(n))  # the retry after a timeout
    await sink.close()
    assert [r["event_id"] for r in lines(path)] == [f"ev_{n}" for n in range(20)]


def test_unwritable_or_missing_places_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"test.toml: \[\[sinks\]\] #2 key 'path'.*does not exist"):
        JsonlSink.from_options({"path": str(tmp_path / "no" / "out.jsonl")}, config())
    with pytest.raises(UsageError, match="is a directory"):
        JsonlSink.from_options({"path": str(tmp_path)}, config())
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="not writable"):
            JsonlSink.from_options({"path": str(locked / "out.jsonl")}, config())
    with pytest.raises(UsageError, match=r"#2 key 'path': expected a file path"):
        JsonlSink.from_options({}, config())
    with pytest.raises(UsageError, match=r"unknown key 'pth' for a jsonl sink; its own keys: path"):
        JsonlSink.from_options({"pth": "x"}, config())
    with pytest.raises(UsageError, match=r"key 'fsync': expected true or false"):
        JsonlSink.from_options({"path": str(tmp_path / "a"), "fsync": "yes"}, config())

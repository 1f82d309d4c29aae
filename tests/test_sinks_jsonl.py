"""The jsonl sink: whole lines, one per event_id (also across re-opens, from the file's last lines),
torn tails tolerated."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from monitor.config import SinkConfig
from monitor.errors import UsageError
from monitor.sinks import jsonl as jsonl_module
from monitor.sinks.jsonl import JsonlSink
from monitor.sinks.recent import RECENT_EVENT_IDS


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


async def test_only_the_files_last_lines_are_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.jsonl"
    total = RECENT_EVENT_IDS + 5_000
    torn = b'{"event_id": "ev_torn", "kind": "exec'
    path.write_bytes(b"".join(json.dumps(record(n)).encode() + b"\n" for n in range(total)) + torn)
    monkeypatch.setattr(jsonl_module, "_READ_CHUNK", 4096)  # many chunks, lines cut at their edges
    sink = await opened(path)
    assert sink.known_event_ids == RECENT_EVENT_IDS
    await sink.send(record(total - 1))  # the newest: held, nothing written
    await sink.send(record(total - RECENT_EVENT_IDS))  # the oldest one read back: held too
    await sink.send(record(0))  # older than the window: the outbox never sends that again
    await sink.close()
    tail = path.read_bytes().split(b"\n")[-3:]
    assert tail[0] == torn  # still skipped, and the next line starts fresh
    assert json.loads(tail[1]) == record(0)
    assert tail[2] == b""


async def test_the_start_up_read_is_bounded_in_bytes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.jsonl"
    big = "x" * 4000
    path.write_text("".join(json.dumps({**record(n), "result": big}) + "\n" for n in range(100)))
    monkeypatch.setattr(jsonl_module, "_READ_CHUNK", 16 * 1024)
    monkeypatch.setattr(jsonl_module, "_TAIL_MAX_BYTES", 64 * 1024)
    sink = await opened(path)
    assert 10 <= sink.known_event_ids <= 16  # about 64 KiB of 4 KB lines, not the 400 KB file
    await sink.send(record(99))
    await sink.close()
    assert len(lines(path)) == 100

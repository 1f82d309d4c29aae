"""The jsonl sink: one complete JSON line per record, appended, never twice for one event_id.

Each line goes out in ONE `os.write` on an O_APPEND descriptor, so a killed process never leaves
half a line behind. On open the event_ids of the file's last lines are read back (not the whole
file: see `monitor.sinks.recent` for why the recent ones are enough), so a redelivery after a crash
writes nothing; memory and start-up time stay bounded however long the file grows. A torn last
line (power loss, another writer) is skipped and the next line starts on a fresh line. Lines are
fsynced before `send` returns; concurrent sends share one fsync (group commit).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any, Self

from monitor.config import SinkConfig
from monitor.errors import UsageError
from monitor.sinks.base import (
    BaseSink,
    DeliveryError,
    encode_record,
    optional_bool,
    optional_int,
    required_str,
)
from monitor.sinks.recent import RECENT_EVENT_IDS, RecentIds

_READ_CHUNK = 1 << 20
_TAIL_MAX_BYTES = 64 << 20  # the start-up read stops here even if the last lines are huge


class JsonlSink(BaseSink):
    KEYS = ("path", "fsync", "concurrency")

    def __init__(self, path: Path, *, fsync: bool = True, concurrency: int = 4) -> None:
        self.path = path
        self.fsync = fsync
        self.concurrency = concurrency
        self._lock = threading.Lock()  # guards the descriptor, the seen set and the counters
        self._fd: int | None = None
        self._seen = RecentIds()  # event_id -> write number (0: already in the file at open)
        self._needs_newline = False
        self._written = 0
        self._synced = 0
        self._sync_lock: asyncio.Lock | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any], common: SinkConfig) -> Self:
        cls.check_keys(options, common)
        raw = required_str(options, common, "path", "a file path")
        path = Path(raw).expanduser()
        problem = _why_unwritable(path)
        if problem:
            raise UsageError(f"{common.where('path')}: cannot append to {raw!r}: {problem}")
        return cls(
            path,
            fsync=optional_bool(options, common, "fsync", True),
            concurrency=optional_int(options, common, "concurrency", 4, 1),
        )

    @property
    def known_event_ids(self) -> int:
        return len(self._seen)

    async def open(self) -> None:
        self._sync_lock = asyncio.Lock()
        try:
            await asyncio.to_thread(self._open)
        except OSError as exc:
            raise UsageError(f"jsonl sink: cannot open {self.path}: {exc.strerror or exc}") from None

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            seen, torn = _scan_tail(self.path, RECENT_EVENT_IDS)
        except BaseException:
            os.close(fd)
            raise
        recent = RecentIds()
        for event_id in seen:
            recent.add(event_id)
        with self._lock:
            self._fd = fd
            self._seen = recent
            self._needs_newline = torn

    async def send(self, record: dict[str, Any]) -> None:
        event_id = str(record.get("event_id") or "")
        if not event_id:
            raise DeliveryError("the record has no event_id", retryable=False)
        data = encode_record(record) + b"\n"
        try:
            number = await asyncio.to_thread(self._append, event_id, data)
            if self.fsync and number > self._synced:
                await self._sync_through(number)
        except OSError as exc:
            raise DeliveryError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _append(self, event_id: str, data: bytes) -> int:
        """Write the line unless the file holds it already; returns its write number."""
        with self._lock:
            if self._fd is None:
                raise DeliveryError("the jsonl sink is closed")
            number = self._seen.get(event_id)
            if number is not None:
                return number
            if self._needs_newline:
                data = b"\n" + data  # the previous line was torn: never glue onto it
            written = os.write(self._fd, data)
            if written != len(data):
                self._needs_newline = True  # a short write (disk full): the next line starts fresh
                raise DeliveryError(f"short write to {self.path} ({written} of {len(data)} bytes)")
            self._needs_newline = False
            self._written += 1
            self._seen.add(event_id, self._written)
            return self._written

    async def _sync_through(self, number: int) -> None:
        """fsync until write `number` is durable; writers that queue up here share one fsync."""
        assert self._sync_lock is not None
        async with self._sync_lock:
            if self._synced >= number:
                return
            self._synced = max(self._synced, await asyncio.to_thread(self._fsync))

    def _fsync(self) -> int:
        with self._lock:
            if self._fd is None:
                raise DeliveryError("the jsonl sink is closed")
            target = self._written
            os.fsync(self._fd)
            return target

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None


def _why_unwritable(path: Path) -> str | None:
    """Why a line could not be appended to `path`, or None (checked at start, before any polling)."""
    if path.is_dir():
        return "it is a directory"
    if path.exists():
        if not path.is_file():
            return "it is not a regular file"
        return None if os.access(path, os.W_OK) else "the file is not writable"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"directory {str(parent)!r} does not exist"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"directory {str(parent)!r} is not writable"


def _scan_tail(path: Path, lines: int) -> tuple[list[str], bool]:
    """The event_ids of the file's last `lines` lines (oldest first), and whether its last line is
    torn (no final newline). Reads backwards from the end, at most about _TAIL_MAX_BYTES."""
    chunks: list[bytes] = []
    newlines = 0
    with path.open("rb") as handle:
        start = handle.seek(0, os.SEEK_END)
        end = start
        while start > 0 and newlines <= lines and end - start < _TAIL_MAX_BYTES:
            size = min(_READ_CHUNK, start)
            start -= size
            handle.seek(start)
            chunks.append(handle.read(size))
            newlines += chunks[-1].count(b"\n")
    pieces = b"".join(reversed(chunks)).split(b"\n")
    torn = bool(pieces.pop())  # what follows the last newline: a line without its end, skipped
    if start > 0:
        pieces = pieces[1:]  # the first may be the end of a line that was not read whole
    return [i for i in map(_event_id_of, pieces[-lines:]) if i], torn


def _event_id_of(line: bytes) -> str | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    event_id = value.get("event_id") if isinstance(value, dict) else None
    return event_id if isinstance(event_id, str) else None

"""The stdout sink: one JSON line per record on standard output, flushed, so `execmon watch | jq` works."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any, Self

from monitor.config import SinkConfig
from monitor.sinks.base import BaseSink, DeliveryError, encode_record
from monitor.sinks.recent import RecentIds


class StdoutSink(BaseSink):
    """Writes in a worker thread: a reader that stops reading must not stall the event loop."""

    KEYS = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._written = RecentIds()  # a retry after a timed-out (but finished) write adds no line

    @classmethod
    def from_options(cls, options: dict[str, Any], common: SinkConfig) -> Self:
        cls.check_keys(options, common)
        return cls()

    async def send(self, record: dict[str, Any]) -> None:
        line = encode_record(record).decode("utf-8") + "\n"
        try:
            await asyncio.to_thread(self._write, str(record.get("event_id", "")), line)
        except BrokenPipeError:
            raise DeliveryError("standard output is closed (the reader went away)", retryable=False) from None
        except OSError as exc:
            raise DeliveryError(f"cannot write to standard output: {exc.strerror or exc}") from None

    def _write(self, event_id: str, line: str) -> None:
        with self._lock:
            if event_id and event_id in self._written:
                return
            out = sys.stdout  # looked up each time: tests and embedders may swap it
            out.write(line)
            out.flush()
            if event_id:
                self._written.add(event_id)  # the oldest is forgotten: bounded for a long-lived process

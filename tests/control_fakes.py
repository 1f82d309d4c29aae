"""An in-memory `ControlBackend` for the control API's unit tests (the engine is the real one)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from monitor.clock import iso_utc
from monitor.config import Config
from monitor.errors import MonitorFailed
from monitor.metrics import Metrics
from monitor.records import TrackResult
from monitor.service.control import ControlServer, ControlState, create_control_app

TERMINAL = frozenset({"completed", "failed", "cancelled", "not_found", "timed_out"})


class MemoryBackend:
    """Executions in a dict, in insertion order; thread-safe so a test thread may inspect it."""

    def __init__(self) -> None:
        self.executions: dict[str, dict[str, Any]] = {}
        self.track_calls: list[list[str]] = []
        self.track_options: list[dict[str, Any]] = []
        self.health_state: tuple[bool, str | None] = (True, None)
        self.dead_letters = 0  # what retry_dead_letters answers
        self.retry_calls: list[tuple[str | None, str | None]] = []
        self._lock = threading.Lock()

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self.executions)

    def add_view(self, execution_id: str, state: str = "running", **fields: Any) -> None:
        view = self._view(execution_id, None, {})
        view.update(state=state, **fields)
        with self._lock:
            self.executions[execution_id] = view

    @staticmethod
    def _view(execution_id: str, group: str | None, labels: dict[str, str]) -> dict[str, Any]:
        now = time.time()
        return {
            "execution_id": execution_id,
            "state": "pending",
            "progress": None,
            "polls": 0,
            "tracked_since": iso_utc(now),
            "last_polled_at": None,
            "next_poll_at": iso_utc(now + 1),
            "group": group,
            "labels": dict(labels),
            "delivered": False,
            "stalled_since": None,
        }

    async def track(
        self,
        ids: list[str],
        *,
        deadline_s: float | None,
        group: str | None,
        labels: dict[str, str],
        batch: str | None = None,
    ) -> TrackResult:
        added: list[str] = []
        already: list[str] = []
        with self._lock:
            self.track_calls.append(list(ids))
            options = {"deadline_s": deadline_s, "group": group, "labels": labels}
            self.track_options.append(options if batch is None else {**options, "batch": batch})
            for execution_id in ids:
                if execution_id in self.executions:
                    already.append(execution_id)
                else:
                    self.executions[execution_id] = self._view(execution_id, group, labels)
                    added.append(execution_id)
        return TrackResult(added=added, already_tracked=already)

    async def untrack(self, execution_id: str) -> bool:
        with self._lock:
            return self.executions.pop(execution_id, None) is not None

    def _matching(self, status: str | None) -> list[dict[str, Any]]:
        with self._lock:
            views = list(self.executions.values())
        if status is None:
            return views
        if status == "terminal":
            return [v for v in views if v["state"] in TERMINAL]
        if status == "active":
            return [v for v in views if v["state"] not in TERMINAL]
        if status == "stalled":
            return [v for v in views if v["stalled_since"] is not None]
        return [v for v in views if v["state"] == status]

    def list_executions(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        return self._matching(status)[offset : offset + limit]

    def count_executions(self, status: str | None) -> int:
        return len(self._matching(status))

    def get_execution(self, execution_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self.executions.get(execution_id)

    def health(self) -> tuple[bool, str | None]:
        return self.health_state

    async def retry_dead_letters(self, *, sink: str | None, event_id: str | None) -> int:
        with self._lock:
            self.retry_calls.append((sink, event_id))
        return self.dead_letters


@contextmanager
def serve_in_thread(state: ControlState, *, max_body_bytes: int = 1_048_576) -> Iterator[ControlServer]:
    """The control API on 127.0.0.1 (a free port), served by a loop in its own thread, for
    synchronous clients (the CLI, schemathesis)."""
    loop = asyncio.new_event_loop()
    server = ControlServer(create_control_app(state, max_body_bytes=max_body_bytes), "127.0.0.1", 0)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, name="control-api", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class FakeEngine:
    """Stands in for `monitor.engine.Monitor` in the daemon's lifecycle tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.backend = MemoryBackend()
        self.metrics = Metrics()
        self.reloads: list[Config] = []
        self.shutdowns: list[float] = []
        self.entered = False
        self.exited = False
        self.reload_error: Exception | None = None
        self.shutdown_delay_s = 0.0

    failure: MonitorFailed | None = None

    async def wait_failed(self) -> MonitorFailed:
        await asyncio.Event().wait()  # a fake never fails
        raise AssertionError("unreachable")

    async def __aenter__(self) -> FakeEngine:
        self.entered = True
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.exited = True

    async def reload(self, config: Config) -> None:
        if self.reload_error is not None:
            raise self.reload_error
        self.reloads.append(config)
        self.config = config

    async def shutdown(self, grace_s: float) -> None:
        self.shutdowns.append(grace_s)
        await asyncio.sleep(self.shutdown_delay_s)

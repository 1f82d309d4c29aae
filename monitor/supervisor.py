"""One `asyncio.TaskGroup` that owns every background task of a Monitor.

The group runs in a task of its own, so that the code that started the Monitor keeps running
and learns of a failure through the Monitor (its `wait`/`results` raise, its health turns
unhealthy), not through a cancellation out of nowhere. A child that raises, or a "forever" child
that returns while nobody asked it to stop, fails the whole group: every other child is
cancelled and `on_failure` gets one `MonitorFailed` naming the task, with the cause chained.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from monitor.errors import ExecmonError, MonitorFailed
from monitor.logs import get_logger

log = get_logger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class Supervisor:
    """`await start()`, then `spawn(coro, name)` any number of times, then `await stop()`."""

    def __init__(self, on_failure: Callable[[MonitorFailed], None]) -> None:
        self._on_failure = on_failure
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self.failure: MonitorFailed | None = None

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="execmon-supervisor")
        await self._ready.wait()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str, *, forever: bool = False) -> asyncio.Task[None]:
        """Run `coro` in the group. `forever`: returning before `stop()` is a failure too."""
        if self._group is None or self.failure is not None:
            coro.close()
            raise RuntimeError("the supervisor is not running")
        return self._group.create_task(self._guarded(coro, name, forever=forever), name=name)

    def spawner(self, *, forever: bool = False) -> Spawn:
        """`spawn` as a plain callable, for the parts that create tasks of their own."""
        return lambda coro, name: self.spawn(coro, name, forever=forever)

    def winding_down(self) -> None:
        """The owner is stopping its parts: a "forever" child that returns now is no failure."""
        self._stopping = True

    async def stop(self) -> None:
        """Cancel every child and wait for them (a failure already reported stays reported)."""
        self._stopping = True
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._ready.set()
                await asyncio.get_running_loop().create_future()  # until stop() or a child's failure
        except* Exception as failures:
            self._fail(failures.exceptions[0])
        finally:
            self._group = None
            self._ready.set()

    async def _guarded(self, coro: Coroutine[Any, Any, None], name: str, *, forever: bool) -> None:
        try:
            await coro
        except MonitorFailed:
            raise
        except Exception as exc:
            raise MonitorFailed(f"internal task {name!r} died: {type(exc).__name__}: {exc}") from exc
        if forever and not self._stopping:
            raise MonitorFailed(f"internal task {name!r} ended unexpectedly")

    def _fail(self, exc: BaseException) -> None:
        failure = exc if isinstance(exc, MonitorFailed) else MonitorFailed(f"{type(exc).__name__}: {exc}")
        if failure is not exc:
            failure.__cause__ = exc
        self.failure = failure
        # A bug gets its traceback in the log; an expected failure (the store) is its message alone.
        cause = failure.__cause__
        trace = cause if cause is not None and not isinstance(cause, ExecmonError) else None
        log.error("execmon cannot go on", error=str(failure), exc_info=trace)
        self._on_failure(failure)

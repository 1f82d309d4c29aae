"""Event-loop health: a lag sampler and a stall watchdog.

A blocked event loop is an outage that no log line inside the loop can report (nothing in the loop
runs). So a watchdog *thread* watches a heartbeat that the loop re-arms every few milliseconds;
when a due heartbeat is more than `threshold_s` late, it logs a warning with the loop thread's
current stack (from `sys._current_frames()`), which names the code that is blocking.

The lag sampler runs inside the loop: it sleeps 0.1 s and reports how late it woke up.

Both measure real elapsed time with `time.monotonic()` on purpose: a stall is a real-time event,
and the watchdog thread cannot read the loop's clock while the loop is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType, TracebackType

from monitor.logs import get_logger

log = get_logger(__name__)

MAX_STACK_FRAMES = 30  # the innermost frames are the interesting ones


def format_stack(frame: FrameType | None) -> str:
    """The stack of a (foreign) thread's frame, innermost call last, as traceback prints it."""
    if frame is None:
        return "<no frame: the loop thread is gone>"
    return "".join(traceback.format_stack(frame, limit=MAX_STACK_FRAMES))


class StallMonitor:
    """Lag sampler plus stall watchdog for the running loop. Use as `async with StallMonitor(...)`.

    `on_lag(seconds)` receives each lag sample (e.g. `Metrics.set_loop_lag`); `on_stall(blocked_s,
    stack)` is called from the watchdog thread once per stall, after the warning is logged.
    """

    def __init__(
        self,
        *,
        threshold_s: float = 0.2,
        lag_interval_s: float = 0.1,
        on_lag: Callable[[float], None] | None = None,
        on_stall: Callable[[float, str], None] | None = None,
    ) -> None:
        self.threshold_s = threshold_s
        self.lag_interval_s = lag_interval_s
        # The heartbeat period bounds how precisely a stall is timed; a few per threshold is enough.
        self.beat_interval_s = max(0.005, threshold_s / 5)
        self._on_lag = on_lag
        self._on_stall = on_stall
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._next_beat_due = 0.0  # monotonic time at which the loop should run the next heartbeat
        self._beat_handle: asyncio.TimerHandle | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalls = 0

    async def __aenter__(self) -> StallMonitor:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def start(self) -> None:
        """Start both monitors on the running loop (call from inside it)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._stop.clear()
        self._beat()
        self._lag_task = self._loop.create_task(self._sample_lag(), name="execmon-loop-lag")
        self._thread = threading.Thread(target=self._watch, name="execmon-stall-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._beat_handle is not None:
            self._beat_handle.cancel()
            self._beat_handle = None
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None
        if self._thread is not None:
            # The watchdog wakes every beat interval, so this join is short; do it off the loop.
            await asyncio.to_thread(self._thread.join, 2.0)
            self._thread = None

    def _beat(self) -> None:
        assert self._loop is not None
        self._next_beat_due = time.monotonic() + self.beat_interval_s
        self._beat_handle = self._loop.call_later(self.beat_interval_s, self._beat)

    async def _sample_lag(self) -> None:
        assert self._loop is not None
        while True:
            started = self._loop.time()
            await asyncio.sleep(self.lag_interval_s)
            lag = max(0.0, self._loop.time() - started - self.lag_interval_s)
            if self._on_lag is not None:
                self._on_lag(lag)

    def _watch(self) -> None:
        """Watchdog thread: one warning per stall, with the blocked loop thread's stack."""
        reported_due: float | None = None  # the heartbeat deadline of the stall already reported
        while not self._stop.wait(self.beat_interval_s):
            due = self._next_beat_due
            overdue = time.monotonic() - due
            if overdue <= self.threshold_s or due == reported_due:
                continue
            reported_due = due
            self._report(overdue)

    def _report(self, blocked_s: float) -> None:
        assert self._loop_thread_id is not None
        frame = sys._current_frames().get(self._loop_thread_id)
        stack = format_stack(frame)
        self.stalls += 1
        log.warning(
            "event loop blocked",
            blocked_ms=round(blocked_s * 1000),
            threshold_ms=round(self.threshold_s * 1000),
            stack=stack,
        )
        if self._on_stall is not None:
            self._on_stall(blocked_s, stack)

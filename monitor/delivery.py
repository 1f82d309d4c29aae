"""The delivery engine: from the outbox to each sink, retried until confirmed or dead-lettered.

Every sink has its own lane (`monitor.sinks.lane`): a pump that moves due outbox rows into a
bounded queue, and the sink's workers that take rows from it. Lanes share nothing but the store,
so a slow, hanging or failing sink never delays polling or another sink. A failed attempt is
retried with capped, fully jittered backoff; a result becomes a dead letter only on a permanent
error or after the sink's `max_age` (default 24 h; or an explicit `max_attempts`). A sink that
keeps failing is paused as a whole by its circuit (`monitor.sinks.circuit`): one probe at a time
until one gets through; a Retry-After pauses it too. A row is marked delivered only after the
sink confirmed it; rows still pending at a crash are loaded again on start (at-least-once;
event_id spots duplicates). The outbox and dead-letter gauges are read from the store at start
and after bulk changes (sink swap, dead-letter retry), and kept up to date in between.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self

from monitor.clock import Clock
from monitor.errors import StoreFault, UsageError
from monitor.logs import get_logger
from monitor.records import TerminalEvent, build_result_record
from monitor.sinks.lane import DeliveryMetrics, Lane, LaneContext, SinkCounters, Spawn
from monitor.sinks.registry import SinkHandle
from monitor.state.protocol import StateStore
from monitor.state.rows import FinishResult

__all__ = ["Delivery", "DeliveryMetrics", "SinkCounters"]

log = get_logger(__name__)


def _create_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.create_task(coro, name=name)


def _ignore_fault(exc: StoreFault) -> None:
    return None


class Delivery:
    """Per-sink lanes over one store. Use as an async context manager, or `start()` / `close()`."""

    def __init__(
        self,
        store: StateStore,
        sinks: Sequence[SinkHandle],
        clock: Clock,
        *,
        metrics: DeliveryMetrics | None = None,
        rng: random.Random | None = None,
        spawn: Spawn = _create_task,
        on_store_fault: Callable[[StoreFault], None] = _ignore_fault,
    ) -> None:
        self._store = store
        self._on_store_fault = on_store_fault
        self._metrics = metrics
        self._ctx = LaneContext(store, clock, rng or random.Random(), metrics, on_store_fault, self._on_change, spawn)
        self._lanes = {h.name: Lane(h, self._ctx) for h in sinks}
        self._changed = asyncio.Event()  # set whenever a row leaves the pending state
        self._started = False
        self._dead_total = 0  # the gauge: counted in the store by _recount, kept up to date here
        store.set_group_sinks([h.name for h in sinks if h.wants_groups])

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open every sink (UsageError if one cannot start), load pending rows, start the lanes."""
        await _open_all([lane.handle for lane in self._lanes.values()])
        for lane in self._lanes.values():
            lane.start()
        self._started = True
        self._recount()

    async def close(self) -> None:
        """Stop every lane and close the sinks. Attempts in flight are abandoned: still pending."""
        self._started = False
        lanes = list(self._lanes.values())
        await asyncio.gather(*(lane.stop() for lane in lanes))
        await _close_all([lane.handle for lane in lanes])

    async def replace_sinks(self, sinks: Sequence[SinkHandle]) -> None:
        """Swap in a new set of sinks: `open_sinks`, then `swap_sinks`."""
        await self.open_sinks(sinks)
        await self.swap_sinks(sinks)

    async def open_sinks(self, sinks: Sequence[SinkHandle]) -> None:
        """Open the sinks of a config reload, beside the current ones. UsageError if one cannot
        start (those already opened are closed again): nothing has changed then."""
        await _open_all(sinks)

    async def swap_sinks(self, sinks: Sequence[SinkHandle]) -> None:
        """Put sinks opened by `open_sinks` in place of the current ones, which are stopped and closed.
        Cannot fail: closing is best effort, and a store fault only delays the new lanes' first scan."""
        old = list(self._lanes.values())
        await asyncio.gather(*(lane.stop() for lane in old))
        await _close_all([lane.handle for lane in old])
        self._lanes = {h.name: Lane(h, self._ctx) for h in sinks}
        self._store.set_group_sinks([h.name for h in sinks if h.wants_groups])
        for lane in self._lanes.values():
            lane.start()
        self._recount()
        self._changed.set()

    # -- what callers use -------------------------------------------------------------------

    @property
    def sinks(self) -> list[SinkHandle]:
        return [lane.handle for lane in self._lanes.values()]

    def route(self, record: dict[str, object]) -> list[str]:
        """The names of the sinks that want this record (their `on` and `events` filters)."""
        return [lane.name for lane in self._lanes.values() if lane.handle.wants(record)]

    def submit(self, event: TerminalEvent) -> FinishResult:
        """Record a terminal outcome and its outbox rows in one transaction, then wake the lanes."""
        return self.submit_record(build_result_record(event), event)

    def submit_record(self, record: dict[str, Any], event: TerminalEvent) -> FinishResult:
        """`submit` with the record already built (StoreFault: nothing was recorded)."""
        result = self._store.finish(
            event.execution_id, event.outcome, record, self.route(record), terminal_at=event.observed_at
        )
        if result.newly_terminal:
            self.notify()
        return result

    def submit_event(self, record: dict[str, Any]) -> int:
        """Enqueue a record that ends nothing (a stall, a resume) for the sinks that want it; the
        rows added (0: seen before). StoreFault: nothing was recorded."""
        added = self._store.enqueue_event(record, self.route(record))
        if added:
            self.notify()
        return added

    def rescan(self) -> None:
        """Look at every pending row again: with replicas, rows that another replica claimed and
        then let lapse (it stopped) become this one's to deliver. A store fault waits for the next."""
        for lane in self._lanes.values():
            try:
                if lane.scan(from_start=True):
                    lane.wake.set()
            except StoreFault as exc:
                self._on_store_fault(exc)
                return

    def notify(self) -> None:
        """New outbox rows were committed: every lane picks up its own."""
        for lane in self._lanes.values():
            lane.wake.set()

    def retry_dead_letters(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Make dead letters pending again (all, one sink's or one event's), with a fresh attempt
        count and max_age, and send them; returns how many. StoreFault: nothing changed."""
        count = self._store.retry_dead(event_id, sink)
        for lane in self._lanes.values():
            try:
                lane.scan(from_start=True)  # the revived rows are older than the last scan
            except StoreFault as exc:  # done all the same: the pump scans from the start again
                self._on_store_fault(exc)
            lane.wake.set()
        self._recount()
        return count

    def depths(self) -> dict[str, int]:
        """Per sink, results not yet confirmed (waiting for a retry, queued or in flight)."""
        return {name: len(lane.known) for name, lane in self._lanes.items()}

    def counters(self) -> dict[str, SinkCounters]:
        return {name: dataclasses.replace(lane.counters) for name, lane in self._lanes.items()}

    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 -- a grace period, part of the API
        """Wait until no row is pending for any sink (each delivered or dead). False on timeout."""
        if not self._started:
            raise RuntimeError("drain() before start()")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for lane in self._lanes.values():
                        if lane.scan():
                            lane.wake.set()
                            self._report_depth()
                    if not any(lane.known for lane in self._lanes.values()):
                        return True
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        except StoreFault as exc:  # what is pending stays pending in the outbox
            self._on_store_fault(exc)
            return False

    # -- the gauges --------------------------------------------------------------------------

    def _on_change(self, dead: int) -> None:
        """A lane's pending rows changed (settled, or found by its pump); `dead` became dead letters."""
        self._dead_total += dead
        self._changed.set()
        self._report_depth()
        if dead:
            self._report_dead()

    def _recount(self) -> None:
        """The gauges from the store: the lanes hold every pending row of their sinks (loaded by
        their scans), and the dead letters are counted there (a restart must not reset them)."""
        try:
            self._dead_total = self._store.dead_count()
        except StoreFault as exc:  # keep the last count; the owner reports the fault
            self._on_store_fault(exc)
        self._report_depth()
        self._report_dead()

    def _report_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.set_outbox_depth(sum(len(lane.known) for lane in self._lanes.values()))

    def _report_dead(self) -> None:
        if self._metrics is not None:
            self._metrics.set_dead_letters(self._dead_total)


async def _open_all(handles: Sequence[SinkHandle]) -> None:
    opened: list[SinkHandle] = []
    try:
        for handle in handles:
            try:
                await handle.sink.open()
            except UsageError:
                raise
            except Exception as exc:  # a sink that cannot start is a configuration problem
                raise UsageError(f"sink {handle.name!r} cannot start: {type(exc).__name__}: {exc}") from None
            opened.append(handle)
    except BaseException:
        await _close_all(opened)
        raise


async def _close_all(handles: Sequence[SinkHandle]) -> None:
    for handle in handles:
        try:
            async with asyncio.timeout(handle.config.timeout_s):
                await handle.sink.close()
        except Exception:  # closing is best effort; the outbox keeps whatever was not confirmed
            log.exception("sink did not close cleanly", sink=handle.name)

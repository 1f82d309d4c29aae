"""The delivery engine: from the outbox to each sink, retried until confirmed or dead-lettered.

Every sink has its own lane: a pump that moves due outbox rows into a bounded queue, and the
sink's workers that take rows from it. Lanes share nothing but the store, so a slow, hanging or
failing sink never delays polling or another sink. Each attempt is bounded by the sink's
`timeout_s`; a failed one is retried with exponential backoff and full jitter
(`uniform(0, min(cap, base * 2**n))`, at least the sink's Retry-After) until `max_attempts`,
then it becomes a dead letter. A row is marked delivered only after the sink confirmed it; rows
still pending at a crash are loaded again on start (at-least-once; event_id spots duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from monitor.backoff import full_jitter
from monitor.clock import Clock
from monitor.errors import StoreFault, UsageError
from monitor.logs import get_logger
from monitor.records import TerminalEvent, build_result_record
from monitor.sinks.base import DeliveryError
from monitor.sinks.registry import SinkHandle
from monitor.state.rows import DeliveryState, OutboxRow
from monitor.state.store import FinishResult, Store

log = get_logger(__name__)

_STORE_ERROR_PAUSE_S = 1.0


Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _create_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.create_task(coro, name=name)


def _ignore_fault(exc: StoreFault) -> None:
    return None


class DeliveryMetrics(Protocol):
    """What the engine reports (monitor.metrics.Metrics has these)."""

    def delivery(self, sink: str, result: str) -> None: ...
    def set_outbox_depth(self, n: int) -> None: ...
    def set_dead_letters(self, n: int) -> None: ...


@dataclass(slots=True)
class SinkCounters:
    """Per sink, since start: confirmed deliveries, failed attempts (each retry) and dead letters."""

    delivered: int = 0
    failed: int = 0
    dead: int = 0


class _Lane:
    """One sink's queue, its due-time heap of pending rows and the tasks that serve them."""

    def __init__(self, handle: SinkHandle) -> None:
        self.handle = handle
        self.name = handle.name
        self.queue: asyncio.Queue[OutboxRow] = asyncio.Queue(maxsize=handle.config.queue_size)
        self.waiting: list[tuple[float, int, str]] = []  # (due loop time, seq, event_id)
        self.known: set[str] = set()  # pending event_ids held here: waiting, queued or in flight
        self.last_seq = 0  # outbox rows up to this seq have been picked up
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.counters = SinkCounters()


class Delivery:
    """Per-sink lanes over one store. Use as an async context manager, or `start()` / `close()`."""

    def __init__(
        self,
        store: Store,
        sinks: Sequence[SinkHandle],
        clock: Clock,
        *,
        metrics: DeliveryMetrics | None = None,
        rng: random.Random | None = None,
        spawn: Spawn = _create_task,
        on_store_fault: Callable[[StoreFault], None] = _ignore_fault,
    ) -> None:
        self._store = store
        self._spawn = spawn  # lane tasks go where the owner supervises them
        self._on_store_fault = on_store_fault
        self._clock = clock
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._lanes = {h.name: _Lane(h) for h in sinks}
        self._changed = asyncio.Event()  # set whenever a row leaves the pending state
        self._started = False
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
            self._start_lane(lane)
        self._started = True
        self._report_depth()

    def _start_lane(self, lane: _Lane) -> None:
        self._scan(lane)
        lane.tasks.append(self._spawn(self._pump(lane), f"execmon-sink-{lane.name}-pump"))
        for n in range(lane.handle.concurrency):
            lane.tasks.append(self._spawn(self._work(lane), f"execmon-sink-{lane.name}-{n}"))

    async def close(self) -> None:
        """Stop every lane and close the sinks. Attempts in flight are abandoned: still pending."""
        self._started = False
        lanes = list(self._lanes.values())
        await asyncio.gather(*(_stop_lane(lane) for lane in lanes))
        await _close_all([lane.handle for lane in lanes])

    async def replace_sinks(self, sinks: Sequence[SinkHandle]) -> None:
        """Swap in a new set of sinks (a config reload). The new ones are opened before the old stop."""
        await _open_all(sinks)
        old = list(self._lanes.values())
        await asyncio.gather(*(_stop_lane(lane) for lane in old))
        await _close_all([lane.handle for lane in old])
        self._lanes = {h.name: _Lane(h) for h in sinks}
        self._store.set_group_sinks([h.name for h in sinks if h.wants_groups])
        for lane in self._lanes.values():
            self._start_lane(lane)
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

    def notify(self) -> None:
        """New outbox rows were committed: every lane picks up its own."""
        for lane in self._lanes.values():
            lane.wake.set()

    def reload(self) -> None:
        """Rows were made pending again outside the engine (`retry_dead`): rescan everything."""
        for lane in self._lanes.values():
            lane.last_seq = 0
            lane.wake.set()

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
                        if self._scan(lane):
                            lane.wake.set()
                    if not any(lane.known for lane in self._lanes.values()):
                        return True
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        except StoreFault as exc:  # what is pending stays pending in the outbox
            self._on_store_fault(exc)
            return False

    # -- the lanes ---------------------------------------------------------------------------

    def _scan(self, lane: _Lane) -> int:
        """Pick up pending rows added since the last scan; returns how many were new here."""
        found = 0
        for seq, event_id, next_attempt_at in self._store.pending_keys(lane.name, lane.last_seq):
            lane.last_seq = max(lane.last_seq, seq)
            if event_id not in lane.known:
                lane.known.add(event_id)
                heapq.heappush(lane.waiting, (self._clock.to_loop(next_attempt_at), seq, event_id))
                found += 1
        if found:
            self._report_depth()
        return found

    async def _pump(self, lane: _Lane) -> None:
        """Move due rows from the heap into the bounded queue; sleep until the next is due."""
        while True:
            lane.wake.clear()
            try:
                self._scan(lane)
                await self._feed(lane)
            except StoreFault as exc:  # reported once by the owner; try again later
                self._on_store_fault(exc)
                await asyncio.sleep(_STORE_ERROR_PAUSE_S)
                continue
            delay = lane.waiting[0][0] - self._clock.now() if lane.waiting else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await lane.wake.wait()

    async def _feed(self, lane: _Lane) -> None:
        while lane.waiting and lane.waiting[0][0] <= self._clock.now():
            entry = heapq.heappop(lane.waiting)
            event_id = entry[2]
            try:
                row = self._store.get_delivery(event_id, lane.name)
            except StoreFault:
                heapq.heappush(lane.waiting, entry)  # keep it; the pump pauses and tries again
                raise
            if row is None or row.state is not DeliveryState.PENDING:
                lane.known.discard(event_id)  # settled elsewhere (retry tool, another run)
                continue
            await lane.queue.put(row)  # waits while the sink's queue is full

    async def _work(self, lane: _Lane) -> None:
        while True:
            row = await lane.queue.get()
            try:
                await self._attempt(lane, row)
            except StoreFault as exc:  # the store could not record the outcome: retry the row later
                self._on_store_fault(exc)
                self._retry_later(lane, row, _STORE_ERROR_PAUSE_S)
            finally:
                lane.queue.task_done()

    async def _attempt(self, lane: _Lane, row: OutboxRow) -> None:
        config = lane.handle.config
        try:
            async with asyncio.timeout(config.timeout_s):
                await lane.handle.sink.send(row.record)
        except DeliveryError as exc:
            self._failed(lane, row, exc.reason, retryable=exc.retryable, retry_after_s=exc.retry_after_s)
        except TimeoutError:
            self._failed(lane, row, f"no confirmation within {config.timeout_s:g} s (timeout_s)")
        except Exception as exc:  # a plugin's bug must not kill the lane; it counts as a failed attempt
            log.exception("sink raised an unexpected error", sink=lane.name, event_id=row.event_id)
            self._failed(lane, row, f"{type(exc).__name__}: {exc}")
        else:
            self._store.mark_delivered(row.event_id, lane.name)
            self._settled(lane, row.event_id, "ok")
            lane.counters.delivered += 1
            log.debug("delivered", sink=lane.name, event_id=row.event_id, attempts=row.attempts + 1)

    def _failed(
        self,
        lane: _Lane,
        row: OutboxRow,
        reason: str,
        *,
        retryable: bool = True,
        retry_after_s: float | None = None,
    ) -> None:
        config = lane.handle.config
        attempts = row.attempts + 1
        if not retryable or attempts >= config.max_attempts:
            why = reason if not retryable else f"gave up after {attempts} attempts; last: {reason}"
            self._store.mark_dead(row.event_id, lane.name, why)
            self._settled(lane, row.event_id, "dead_letter")
            lane.counters.dead += 1
            log.error(
                "delivery failed for good (dead letter)",
                sink=lane.name,
                event_id=row.event_id,
                execution_id=row.execution_id,
                attempts=attempts,
                reason=why,
            )
            if self._metrics is not None:
                self._metrics.set_dead_letters(self._store.dead_count())
            return
        delay = full_jitter(attempts, config.backoff_base_s, config.backoff_cap_s, self._rng)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, config.backoff_cap_s))
        due = self._clock.now() + delay
        self._store.mark_failed(row.event_id, lane.name, reason, self._clock.wall(due))
        heapq.heappush(lane.waiting, (due, row.seq, row.event_id))
        lane.wake.set()
        lane.counters.failed += 1
        if self._metrics is not None:
            self._metrics.delivery(lane.name, "retry")
        log.warning(
            "delivery attempt failed; will retry",
            sink=lane.name,
            event_id=row.event_id,
            attempt=attempts,
            retry_in_s=round(delay, 3),
            reason=reason,
        )

    def _retry_later(self, lane: _Lane, row: OutboxRow, delay: float) -> None:
        heapq.heappush(lane.waiting, (self._clock.now() + delay, row.seq, row.event_id))
        lane.wake.set()

    def _settled(self, lane: _Lane, event_id: str, result: str) -> None:
        lane.known.discard(event_id)
        self._changed.set()
        if self._metrics is not None:
            self._metrics.delivery(lane.name, result)
        self._report_depth()

    def _report_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.set_outbox_depth(sum(len(lane.known) for lane in self._lanes.values()))


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


async def _stop_lane(lane: _Lane) -> None:
    for task in lane.tasks:
        task.cancel()
    await asyncio.gather(*lane.tasks, return_exceptions=True)
    lane.tasks.clear()

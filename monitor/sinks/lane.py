"""One sink's lane in the delivery engine (`monitor.delivery`): its heap, queue, circuit and tasks.

A pump moves due outbox rows into a bounded queue while the sink's circuit lets them go; the
sink's workers take rows from it, attempt them (bounded by `timeout_s`) and record the verdict.
A failed attempt is retried with exponential backoff and full jitter (`uniform(0, min(cap, base *
2**n))`, at least the sink's Retry-After). A row becomes a dead letter on a permanent error, on a
failure after the sink's `max_age` (counted from when it entered the outbox), past an explicit
`max_attempts`, or, while the circuit is open and it waits unattempted, once `max_age` passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from monitor.backoff import full_jitter
from monitor.clock import Clock
from monitor.config import SinkConfig
from monitor.errors import StoreFault
from monitor.logs import get_logger
from monitor.sinks.base import DeliveryError
from monitor.sinks.circuit import Circuit
from monitor.sinks.registry import SinkHandle
from monitor.state.protocol import StateStore
from monitor.state.rows import DeliveryState, OutboxRow

log = get_logger("monitor.delivery")

STORE_ERROR_PAUSE_S = 1.0
_SWEEP_EVERY_S = 60.0  # how often an open circuit looks for rows past max_age (at most)
_SWEEP_BATCH = 1000

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class DeliveryMetrics(Protocol):
    """What the engine reports (monitor.metrics.Metrics has these)."""

    def delivery(self, sink: str, result: str) -> None: ...
    def set_outbox_depth(self, n: int) -> None: ...
    def set_dead_letters(self, n: int) -> None: ...
    def set_circuit_open(self, sink: str, is_open: bool) -> None: ...


@dataclass(slots=True)
class SinkCounters:
    """Per sink, since start: confirmed deliveries, failed attempts (each retry) and dead letters."""

    delivered: int = 0
    failed: int = 0
    dead: int = 0


@dataclass(frozen=True, slots=True)
class LaneContext:
    """What every lane shares with the engine. `on_change(dead)`: the lane's pending rows changed
    (some settled, or its pump found new ones), `dead` of them became dead letters; the engine's
    gauges and `drain` follow."""

    store: StateStore
    clock: Clock
    rng: random.Random
    metrics: DeliveryMetrics | None
    on_store_fault: Callable[[StoreFault], None]
    on_change: Callable[[int], None]
    spawn: Spawn  # lane tasks go where the engine's owner supervises them


class Lane:
    """One sink: pending rows (a due-time heap), its queue, circuit, pump and workers."""

    def __init__(self, handle: SinkHandle, ctx: LaneContext) -> None:
        self.handle = handle
        self.name = handle.name
        self._ctx = ctx
        config = handle.config
        self.queue: asyncio.Queue[OutboxRow] = asyncio.Queue(maxsize=config.queue_size)
        self.waiting: list[tuple[float, int, str]] = []  # (due loop time, seq, event_id)
        self.known: set[str] = set()  # pending event_ids held here: waiting, queued or in flight
        self.last_seq = 0  # outbox rows up to this seq have been picked up
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.counters = SinkCounters()
        self.circuit = Circuit(config.pause_after_failures, config.backoff_base_s, config.backoff_cap_s, ctx.rng)
        self._in_flight: set[str] = set()  # event_ids being attempted right now
        self._next_sweep = 0.0  # loop time of the next look for rows past max_age (while open)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Load pending rows (a store fault is reported; the pump scans again) and start the tasks."""
        try:
            self.scan()
        except StoreFault as exc:
            self._ctx.on_store_fault(exc)
        self._report_circuit()
        self.tasks.append(self._ctx.spawn(self._pump(), f"execmon-sink-{self.name}-pump"))
        for n in range(self.handle.concurrency):
            self.tasks.append(self._ctx.spawn(self._work(), f"execmon-sink-{self.name}-{n}"))

    async def stop(self) -> None:
        """Cancel the tasks; attempts in flight are abandoned (still pending in the store)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        if self.circuit.is_open and self._ctx.metrics is not None:
            self._ctx.metrics.set_circuit_open(self.name, False)  # a sink no longer served is not paused

    def scan(self, *, from_start: bool = False) -> int:
        """Pick up pending rows added since the last scan (or all: `from_start`); how many were new."""
        if from_start:
            self.last_seq = 0
        found = 0
        for seq, event_id, next_attempt_at in self._ctx.store.pending_keys(self.name, self.last_seq):
            self.last_seq = max(self.last_seq, seq)
            if event_id not in self.known:
                self.known.add(event_id)
                heapq.heappush(self.waiting, (self._ctx.clock.to_loop(next_attempt_at), seq, event_id))
                found += 1
        return found

    # -- the pump ------------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Move due rows into the queue while the circuit lets them go; sleep until the next is
        due and allowed (or, while open, until the next max_age sweep)."""
        while True:
            self.wake.clear()
            try:
                if self.scan():
                    self._ctx.on_change(0)
                self._sweep()
                await self._feed()
            except StoreFault as exc:  # reported once by the owner; try again later
                self._ctx.on_store_fault(exc)
                await asyncio.sleep(STORE_ERROR_PAUSE_S)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_s()):
                    await self.wake.wait()

    def _idle_s(self) -> float | None:
        wakes = []
        resume = self.circuit.resume_at()  # None: a probe is out, and its verdict wakes the pump
        if self.waiting and resume is not None:
            wakes.append(max(self.waiting[0][0], resume))
        if self.circuit.is_open and self.known:
            wakes.append(self._next_sweep)
        return max(0.0, min(wakes) - self._ctx.clock.now()) if wakes else None

    async def _feed(self) -> None:
        circuit = self.circuit
        while self.waiting and self.waiting[0][0] <= (now := self._ctx.clock.now()):
            probing = circuit.may_probe(now)
            if not (probing or circuit.may_send(now)):
                return  # paused: the backlog waits in the heap (and the store)
            entry = heapq.heappop(self.waiting)
            event_id = entry[2]
            if event_id not in self.known:
                continue  # dead-lettered by a max_age sweep
            try:
                row = self._ctx.store.get_delivery(event_id, self.name)
            except StoreFault:
                heapq.heappush(self.waiting, entry)  # keep it; the pump pauses and tries again
                raise
            if row is None or row.state is not DeliveryState.PENDING:
                self.known.discard(event_id)  # settled elsewhere (retry tool, another run)
                continue
            if probing:
                circuit.probe = event_id  # the one row that tests an open circuit
            await self.queue.put(row)  # waits while the sink's queue is full

    def _sweep(self) -> None:
        """While the circuit is open, rows wait unattempted: those past max_age become dead letters."""
        now = self._ctx.clock.now()
        if not (self.circuit.is_open and self.known) or now < self._next_sweep:
            return
        config = self.handle.config
        why = f"not delivered within max_age ({config.max_age:g} s) while the sink was failing"
        cutoff = self._ctx.clock.wall() - config.max_age
        expired = self._ctx.store.expire_pending(self.name, cutoff, why, keep=self._in_flight, limit=_SWEEP_BATCH)
        full = len(expired) == _SWEEP_BATCH  # more may be waiting: look again at once
        self._next_sweep = now if full else now + min(_SWEEP_EVERY_S, config.max_age / 10)
        if not expired:
            return
        for event_id in expired:
            self._settled(event_id, "dead_letter", dead=1)
        self.counters.dead += len(expired)
        log.error("results past max_age while the sink was failing (dead letters)", sink=self.name, count=len(expired))

    # -- the workers ---------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            row = await self.queue.get()
            event_id = row.event_id
            try:
                if event_id not in self.known:
                    continue  # dead-lettered by a max_age sweep while it was queued
                if not self.circuit.admits(event_id, self._ctx.clock.now()):
                    self._retry_later(row, 0.0)  # paused since it was queued: no attempt spent
                    continue
                self._in_flight.add(event_id)
                await self._attempt(row)
            except StoreFault as exc:  # the store could not record the outcome: retry the row later
                self._ctx.on_store_fault(exc)
                self._retry_later(row, STORE_ERROR_PAUSE_S)
            finally:
                self._in_flight.discard(event_id)
                self.circuit.release(event_id)
                if self.circuit.is_open:
                    self.wake.set()  # a probe's verdict: the pump may plan the next one
                self.queue.task_done()

    async def _attempt(self, row: OutboxRow) -> None:
        config = self.handle.config
        try:
            async with asyncio.timeout(config.timeout_s):
                await self.handle.sink.send(row.record)
        except DeliveryError as exc:
            self._failed(row, exc.reason, retryable=exc.retryable, retry_after_s=exc.retry_after_s)
        except TimeoutError:
            self._failed(row, f"no confirmation within {config.timeout_s:g} s (timeout_s)")
        except Exception as exc:  # a plugin's bug must not kill the lane; it counts as a failed attempt
            log.exception("sink raised an unexpected error", sink=self.name, event_id=row.event_id)
            self._failed(row, f"{type(exc).__name__}: {exc}")
        else:
            self._sink_answered()
            self._ctx.store.mark_delivered(row.event_id, self.name)
            self._settled(row.event_id, "ok")
            self.counters.delivered += 1
            log.debug("delivered", sink=self.name, event_id=row.event_id, attempts=row.attempts + 1)

    def _sink_answered(self) -> None:
        """The sink took an attempt (or refused it for good): it is up, and an open circuit closes."""
        opened_at = self.circuit.opened_at
        if not self.circuit.succeeded():
            return
        now = self._ctx.clock.now()
        self.waiting = [(min(due, now), seq, event_id) for due, seq, event_id in self.waiting]
        heapq.heapify(self.waiting)  # the backlog flows again, whatever its rows' own backoff said
        self.wake.set()
        self._report_circuit()
        paused_s = round(now - (opened_at if opened_at is not None else now), 1)
        log.info("sink is back: circuit closed, sending the backlog", sink=self.name, paused_s=paused_s)

    def _failed(
        self, row: OutboxRow, reason: str, *, retryable: bool = True, retry_after_s: float | None = None
    ) -> None:
        if not retryable:
            self._sink_answered()  # a permanent refusal is an answer: the sink is up
            self._dead(row, reason, row.attempts + 1)
            return
        config, circuit, now = self.handle.config, self.circuit, self._ctx.clock.now()
        if retry_after_s is not None:
            circuit.pause(now, min(retry_after_s, config.backoff_cap_s))  # the whole sink waits
        if circuit.failed(row.event_id, now):
            self._report_circuit()
            log.warning(
                "sink keeps failing: circuit open, nothing is sent but one probe at a time",
                sink=self.name,
                failures=circuit.failures,
                probe_in_s=round(circuit.paused_until - now, 3),
                reason=reason,
            )
        attempts = row.attempts + 1
        why = gave_up(config, attempts, self._ctx.clock.wall() - row.created_at, reason)
        if why is not None:
            self._dead(row, why, attempts)
            return
        delay = full_jitter(attempts, config.backoff_base_s, config.backoff_cap_s, self._ctx.rng)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, config.backoff_cap_s))
        due = now + delay
        self._ctx.store.mark_failed(row.event_id, self.name, reason, self._ctx.clock.wall(due))
        heapq.heappush(self.waiting, (due, row.seq, row.event_id))
        self.wake.set()
        self.counters.failed += 1
        if self._ctx.metrics is not None:
            self._ctx.metrics.delivery(self.name, "retry")
        log.warning(
            "delivery attempt failed; will retry",
            sink=self.name,
            event_id=row.event_id,
            attempt=attempts,
            retry_in_s=round(delay, 3),
            reason=reason,
        )

    def _dead(self, row: OutboxRow, why: str, attempts: int) -> None:
        marked = self._ctx.store.mark_dead(row.event_id, self.name, why)
        self.counters.dead += 1
        self._settled(row.event_id, "dead_letter", dead=1 if marked else 0)
        log.error(
            "delivery failed for good (dead letter)",
            sink=self.name,
            event_id=row.event_id,
            execution_id=row.execution_id,
            attempts=attempts,
            reason=why,
        )

    def _retry_later(self, row: OutboxRow, delay: float) -> None:
        heapq.heappush(self.waiting, (self._ctx.clock.now() + delay, row.seq, row.event_id))
        self.wake.set()

    def _settled(self, event_id: str, result: str, *, dead: int = 0) -> None:
        self.known.discard(event_id)
        if self._ctx.metrics is not None:
            self._ctx.metrics.delivery(self.name, result)
        self._ctx.on_change(dead)

    def _report_circuit(self) -> None:
        if self._ctx.metrics is not None:
            self._ctx.metrics.set_circuit_open(self.name, self.circuit.is_open)


def gave_up(config: SinkConfig, attempts: int, age_s: float, reason: str) -> str | None:
    """Why a failed attempt ends its row (a dead letter), or None to retry it."""
    if config.max_attempts is not None and attempts >= config.max_attempts:
        return f"gave up after {attempts} attempts; last: {reason}"
    if age_s >= config.max_age:
        return f"not delivered within max_age ({config.max_age:g} s), {attempts} attempts; last: {reason}"
    return None

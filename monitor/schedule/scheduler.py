"""The polling loop: one budget token at a time, late-bound to the execution the policy picks.

    slot (max_in_flight) -> something ready? -> budget token -> policy.choose(now) -> poll task

One ID never has two polls in flight (a chosen execution leaves the policy's heaps until its
answer is handled). Answers: terminal -> TerminalEvent (awaited by the listener, then the ID is
forgotten); running -> the policy schedules the next poll; transient error -> retry that execution
after uniform(0, min(cap, base * 2**n)) (full jitter, apart from the cadence); 429 -> the whole key
pauses (Budget.throttle); 401 -> the key is blocked at once and nothing more is sent until
`resume`; 404 -> confirmed K times over at least a span before `not_found`; deadline -> timed_out.
Running answers also go through the stall detector (`monitor.schedule.stalls`): a freeze is one
`on_stall` call when it crosses the threshold, and one more when the execution moves again.
The key's state (rejected or not) lives here and nowhere else. `hold(reason)` pauses polling for
reasons of the owner's (the state store failing): no token is taken while any hold is on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from monitor.api.errors import (
    ApiError,
    ExecutionNotFound,
    KeyRejected,
    Throttled,
    TransientError,
    TransientReason,
)
from monitor.api.models import ExecutionStatus, StatusRecord
from monitor.backoff import full_jitter
from monitor.clock import Clock, parse_iso
from monitor.errors import StoreFault
from monitor.ids import validate_execution_id
from monitor.logs import get_logger
from monitor.records import Outcome, StallEvent, TerminalEvent
from monitor.schedule.budget import Budget, Ticket
from monitor.schedule.lattice import STAMP_TOL_S, WHOLE_SECOND_S
from monitor.schedule.persist import export_state, restore_state
from monitor.schedule.policy import Policy
from monitor.schedule.stalls import KIND_LABEL, StallDetector
from monitor.schedule.state import ExecState

log = get_logger(__name__)


class StatusSource(Protocol):
    async def get_status(self, execution_id: str) -> StatusRecord: ...


class SchedulerListener(Protocol):
    async def on_terminal(self, event: TerminalEvent) -> None:
        """Awaited; the ID is forgotten after it returns (write the outbox here)."""

    def on_poll(self, execution_id: str, status: StatusRecord | None, error: str | None) -> None:
        """Every answer: a status, or the error text (persistence, live view, logs)."""

    def on_stall(self, event: StallEvent) -> None:
        """A freeze crossed the threshold, or ended: record it (StoreFault: asked again next answer)."""

    def on_key_rejected(self, reason: str) -> None:
        """The key was rejected: nothing is sent until `Scheduler.resume`."""

    def on_throttled(self, retry_after_s: float | None) -> None: ...

    def on_store_fault(self, exc: StoreFault) -> None:
        """Recording a request failed before it was sent (it was not sent); expect a `hold`."""


class NullListener:
    """A listener that ignores everything; subclass it and override what you need."""

    async def on_terminal(self, event: TerminalEvent) -> None:
        return None

    def on_poll(self, execution_id: str, status: StatusRecord | None, error: str | None) -> None:
        return None

    def on_stall(self, event: StallEvent) -> None:
        return None

    def on_key_rejected(self, reason: str) -> None:
        return None

    def on_throttled(self, retry_after_s: float | None) -> None:
        return None

    def on_store_fault(self, exc: StoreFault) -> None:
        return None


Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _create_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.create_task(coro, name=name)


class _Waker:
    """Sleep until a loop time or until notified, whichever comes first (one waiter)."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._future = future
        handle = loop.call_at(until, _resolve, future) if math.isfinite(until) else None
        try:
            await future
        finally:
            if handle is not None:
                handle.cancel()
            self._future = None

    def notify(self) -> None:
        if self._future is not None:
            _resolve(self._future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Scheduler:
    def __init__(
        self,
        source: StatusSource,
        budget: Budget,
        policy: Policy,
        clock: Clock,
        *,
        max_in_flight: int = 4,
        not_found_confirmations: int = 3,
        not_found_min_span_s: float = 5.0,
        error_backoff_base_s: float = 1.0,
        error_backoff_cap_s: float = 60.0,
        stall_after: float | None = None,  # seconds ([polling] stall_after); None: "auto"
        listener: SchedulerListener | None = None,
        rng: random.Random | None = None,
        spawn: Spawn = _create_task,
    ) -> None:
        if max_in_flight < 1 or not_found_confirmations < 1:
            raise ValueError("max_in_flight and not_found_confirmations must be at least 1")
        self._source = source
        self._budget = budget
        self._policy = policy
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._nf_needed = not_found_confirmations
        self._nf_span = not_found_min_span_s
        self._err_base = error_backoff_base_s
        self._err_cap = error_backoff_cap_s
        self._listener: SchedulerListener = listener or NullListener()
        self.stalls = StallDetector(clock, stall_after)
        self._rng = rng or random.Random()
        policy.bind_rate(lambda: budget.rate_per_s)
        self._states: dict[str, ExecState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._deadlines: list[tuple[float, int, ExecState]] = []
        self._seq = itertools.count()
        self._wake = _Waker()
        self._wake_deadlines = _Waker()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots: asyncio.Semaphore | None = None
        self._inner: list[asyncio.Task[None]] = []
        self._drained = asyncio.Event()
        self._stopping = False
        self._unknown_seen: set[str] = set()
        self._spawn = spawn  # poll tasks go where the owner supervises them
        self._holds: set[str] = set()
        self.key_rejected: str | None = None  # the reason, while the key is rejected

    # -- what is tracked ------------------------------------------------------------------------

    @property
    def tracked_count(self) -> int:
        return len(self._states)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def policy(self) -> Policy:
        return self._policy

    def track(
        self,
        execution_id: str,
        *,
        deadline_s: float | None = None,
        group: str | None = None,
        labels: dict[str, str] | None = None,
        restored: dict[str, Any] | None = None,
    ) -> bool:
        """Start watching an ID (InvalidExecutionId for a bad one). False, and no change, if tracked."""
        validate_execution_id(execution_id)
        if execution_id in self._states:
            return False
        now = self._clock.now()
        state = ExecState(execution_id, now, group=group, labels=labels)
        if restored:
            restore_state(state, restored, self._clock)
        if deadline_s is not None and deadline_s > 0:
            state.expires_at = state.tracked_since + deadline_s
        self._states[execution_id] = state
        self._policy.add(state, now)
        if state.expires_at is not None:
            heapq.heappush(self._deadlines, (state.expires_at, next(self._seq), state))
            self._wake_deadlines.notify()
        self._idle.clear()
        self._wake.notify()
        return True

    def untrack(self, execution_id: str) -> bool:
        state = self._states.pop(execution_id, None)
        if state is None:
            return False
        if state.live:
            state.live = False
            self._policy.remove(state, self._clock.now())
        self._check_idle()
        return True

    def poll_first(self, execution_id: str) -> None:
        """Poll it before anything else (taken over from a replica that stopped: nobody has for a while)."""
        state = self._states.get(execution_id)
        if state is not None and state.live and not state.in_flight:
            self._policy.poll_first(state)
            self._wake.notify()

    def export_state(self, execution_id: str) -> dict[str, Any] | None:
        """JSON-able schedule state (epoch times) to persist and pass back as `restored`."""
        state = self._states.get(execution_id)
        return None if state is None else export_state(state, self._clock)

    def snapshot(self, execution_id: str) -> dict[str, Any] | None:
        """export_state plus what the policy plans (for `execmon status` and the live view)."""
        state = self._states.get(execution_id)
        if state is None:
            return None
        info = export_state(state, self._clock)
        info["in_flight"] = state.in_flight
        info["next_poll_at"] = self._clock.wall(state.due) if math.isfinite(state.due) else None
        info["eta"] = self._clock.wall(state.eta) if math.isfinite(state.eta) else None
        info["stall_after_s"] = self.stalls.limit(state)
        return info

    def tracked_ids(self) -> list[str]:
        return list(self._states)

    def stalled_counts(self) -> dict[str, int]:
        """Executions stalled now, by their `kind` label ("" without one)."""
        counts: dict[str, int] = {}
        for state in self._states.values():
            if state.stall_key is not None and state.stall_key == state.freeze:
                kind = (state.labels or {}).get(KIND_LABEL, "")
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until `stop()` (which drains in-flight polls) or until cancelled. Runs once:
        after a stop (even one that came before `run` started) it returns at once."""
        if self._stopping:
            return
        self._slots = asyncio.Semaphore(self._max_in_flight)
        self._inner = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._watch_deadlines())]
        try:
            done, _ = await asyncio.wait(self._inner, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled():
                    task.result()  # they only end by cancellation; anything else is a bug: surface it
            await self._drained.wait()
        finally:
            await self._cancel_all()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Take no more tokens; let in-flight polls finish within grace_s, then cancel them."""
        self._stopping = True
        for task in self._inner:
            task.cancel()
        await asyncio.gather(*self._inner, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._drained.set()

    async def _cancel_all(self) -> None:
        tasks = [t for t in (*self._inner, *self._tasks) if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Until nothing is tracked and nothing is in flight."""
        while self._states or self._tasks:
            self._idle.clear()
            await self._idle.wait()

    def resume(self, new_source: StatusSource | None = None) -> None:
        """After the key was rejected and replaced (a reload): poll again, with the new source."""
        if new_source is not None:
            self._source = new_source
        self.key_rejected = None
        self._budget.unblock()
        self._wake.notify()

    def hold(self, reason: str) -> None:
        """Take no more tokens until `release_hold(reason)` (polls in flight finish)."""
        self._holds.add(reason)

    def release_hold(self, reason: str) -> None:
        self._holds.discard(reason)
        self._wake.notify()

    @property
    def paused(self) -> bool:
        return bool(self._holds) or self.key_rejected is not None

    def _check_idle(self) -> None:
        if not self._states and not self._tasks:
            self._idle.set()

    # -- the loop -------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        slots = self._slots
        assert slots is not None
        while True:
            await slots.acquire()
            try:
                await self._wait_ready()
                ticket = await self._budget.acquire()
            except StoreFault as exc:  # the request could not be recorded, so it was not sent
                slots.release()
                self._listener.on_store_fault(exc)
                continue
            except BaseException:
                slots.release()
                raise
            state = None if self.paused else self._policy.choose(self._clock.now())
            if state is None:
                self._budget.release(ticket, used=False)
                slots.release()
                continue
            state.in_flight = True
            task = self._spawn(self._poll(state, ticket, slots), "execmon-poll")
            self._tasks.add(task)

    async def _wait_ready(self) -> None:
        while True:
            now = self._clock.now()
            at = math.inf if self.paused else self._policy.ready_at(now)
            if at <= now:
                return
            await self._wake.wait(at)

    async def _poll(self, state: ExecState, ticket: Ticket, slots: asyncio.Semaphore) -> None:
        try:
            if self.paused or self._stopping:
                self._budget.release(ticket, used=False)  # nothing is sent after a 401 or a hold
                self._requeue(state, self._clock.now())
                return
            state.polls += 1
            try:
                status = await self._source.get_status(state.execution_id)
            except ApiError as exc:
                self._budget.release(ticket)
                await self._handle_error(state, exc)
            except Exception as exc:  # a bug in a source must not stop the monitor: retry it
                self._budget.release(ticket)
                log.exception("status source failed", execution_id=state.execution_id)
                detail = f"status source failed: {type(exc).__name__}"
                await self._handle_error(state, TransientError(TransientReason.CONNECTION, detail))
            else:
                self._budget.release(ticket)
                await self._handle_status(state, status)
        except asyncio.CancelledError:
            self._budget.release(ticket)  # it may have been sent: count it
            self._requeue(state, self._clock.now())
            raise
        finally:
            state.in_flight = False
            slots.release()
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            self._wake.notify()
            self._check_idle()

    def _requeue(self, state: ExecState, now: float) -> None:
        if state.live:
            self._policy.hold(state, now)

    # -- answers --------------------------------------------------------------------------------

    async def _handle_status(self, state: ExecState, status: StatusRecord) -> None:
        now = self._clock.now()
        state.errors = 0
        state.nf_count = 0
        state.progress = status.progress
        state.raw_status = status.raw_status
        if state.live and not status.status.terminal:
            self._observe_stall(state, status, now)  # first: the poll's bookkeeping then carries it
        self._listener.on_poll(state.execution_id, status, None)
        if not state.live:
            return  # untracked while the request was out
        if status.status.terminal:
            await self._finish(state, Outcome.from_status(status.status), status)
            return
        if status.status is ExecutionStatus.UNKNOWN and status.raw_status not in self._unknown_seen:
            self._unknown_seen.add(status.raw_status[:64])
            log.warning("undocumented status, polling on", status=status.raw_status[:64])
        if self._expired(state, now):
            await self._finish(state, Outcome.TIMED_OUT, status)
            return
        state.last_poll = now
        if status.progress is not None:
            state.add_sample(self._stamp(state, status, now), status.progress)
        self._policy.polled(state, now)

    def _observe_stall(self, state: ExecState, status: StatusRecord, now: float) -> None:
        event = self.stalls.observe(state, status, now)
        if event is not None:
            try:
                self._listener.on_stall(event)
            except StoreFault:
                pass  # not recorded: the next answer calls for it again, with the same event_id
            else:
                self.stalls.applied(state, event)
        state.check_at = self.stalls.crossing(state, now)

    def _stamp(self, state: ExecState, status: StatusRecord, now: float) -> float:
        """When the reported progress was reached: `updated_at` when the server sent a plausible one
        (not in the future, not before the previous sample's stamp), else the moment of the poll."""
        stamp = parse_iso(status.updated_at) if status.updated_at else None
        if stamp is None:
            return now
        if stamp != math.floor(stamp):
            state.stamp_tol = STAMP_TOL_S
        elif not state.stamp_tol:  # whole seconds, as long as no stamp of this run says otherwise
            state.stamp_tol = WHOLE_SECOND_S
        at = min(self._clock.to_loop(stamp), now)
        samples = state.samples
        if samples:
            at = max(at, samples[-2])
        return at

    async def _handle_error(self, state: ExecState, exc: ApiError) -> None:
        now = self._clock.now()
        self._listener.on_poll(state.execution_id, None, str(exc))
        if not state.live:
            return
        if isinstance(exc, KeyRejected):
            if self.key_rejected is None:
                self.key_rejected = str(exc)
                self._budget.block()
                self._listener.on_key_rejected(self.key_rejected)
            self._policy.hold(state, now)
            return
        if self._expired(state, now):
            await self._finish(state, Outcome.TIMED_OUT, None)
            return
        if isinstance(exc, Throttled):
            self._budget.throttle(exc.retry_after_s)
            self._listener.on_throttled(exc.retry_after_s)
            self._policy.hold(state, now)
        elif isinstance(exc, ExecutionNotFound):
            await self._not_found(state, now)
        else:
            state.errors += 1
            delay = full_jitter(state.errors, self._err_base, self._err_cap, self._rng)
            self._policy.hold(state, now + delay)

    async def _not_found(self, state: ExecState, now: float) -> None:
        """A 404 may be an ID not visible yet: only K answers spanning the minimum span make it final."""
        if state.nf_count == 0:
            state.nf_first = now
        state.nf_count += 1
        if state.nf_count >= self._nf_needed and now - state.nf_first >= self._nf_span:
            await self._finish(state, Outcome.NOT_FOUND, None)
            return
        spacing = self._nf_span / max(self._nf_needed - 1, 1)
        at = now + spacing
        if state.nf_count >= self._nf_needed - 1:
            at = max(at, state.nf_first + self._nf_span)
        self._policy.hold(state, at)

    def _expired(self, state: ExecState, now: float) -> bool:
        return state.expires_at is not None and now >= state.expires_at

    async def _finish(self, state: ExecState, outcome: Outcome, status: StatusRecord | None) -> None:
        now = self._clock.now()
        state.live = False
        self._policy.remove(state, now)
        if status is not None and status.status.terminal:
            self._policy.finished(state, self._ended_at(state, status, now), outcome, _run_s(status))
        event = TerminalEvent(
            execution_id=state.execution_id,
            outcome=outcome,
            observed_at=self._clock.wall(now),
            tracked_since=self._clock.wall(state.tracked_since),
            polls=state.polls,
            status=status,
            group=state.group,
            labels=dict(state.labels or {}),
        )
        try:
            await self._listener.on_terminal(event)
        except StoreFault:
            # The result could not be recorded (the owner holds polling until the store is back, and
            # has said so once): keep the execution and ask again later. Any other error is a bug
            # and fails the owner's supervisor, loudly.
            if self._states.get(state.execution_id) is state:
                state.live = True
                self._policy.add(state, now)
                state.errors += 1
                self._policy.hold(state, now + full_jitter(state.errors, self._err_base, self._err_cap, self._rng))
            return
        if self._states.get(state.execution_id) is state:
            del self._states[state.execution_id]
        self._check_idle()

    def _ended_at(self, state: ExecState, status: StatusRecord | None, now: float) -> float:
        """Loop time it ended: the server's timestamp when plausible, else midway since the last poll."""
        stamp = parse_iso(status.finished_at) if status is not None and status.finished_at else None
        if stamp is not None:
            at = self._clock.to_loop(stamp)
            if state.last_poll - 1.0 <= at <= now + 1.0:
                return min(max(at, state.last_poll), now)
        return (state.last_poll + now) / 2

    # -- deadlines ------------------------------------------------------------------------------

    async def _watch_deadlines(self) -> None:
        heap = self._deadlines
        while True:
            now = self._clock.now()
            while heap and heap[0][0] <= now:
                _, _, state = heapq.heappop(heap)
                if state.live and not state.in_flight and self._expired(state, now):
                    await self._finish(state, Outcome.TIMED_OUT, None)
                # In flight: the poll's answer decides (a terminal answer wins over the deadline).
            await self._wake_deadlines.wait(heap[0][0] if heap else math.inf)


def _run_s(status: StatusRecord) -> float | None:
    """`metadata.execution_time` when it is a plausible number of seconds."""
    value = (status.metadata or {}).get("execution_time")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None

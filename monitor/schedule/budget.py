"""The request budget of one API key: never more than N requests in any sliding window of T seconds,
as the server counts them, from the first second, after idle spells, retries and 404s included.

Two mechanisms, one for smoothness and one for the guarantee:
- pacing: `aiolimiter.AsyncLimiter(1, T/N)` spaces request starts T/N apart (a leaky bucket of
  capacity 1 never bursts; `AsyncLimiter(N, T)` would let N through at once and ~2N in the first T);
- the hard guarantee: a log of the last requests' stamps. A request may start only while fewer than
  N requests are in the window (now - T, now], counting every request still in flight as in the
  window. A request's stamp is the time its answer came back, which is never before the server saw
  it; so if stamp <= start - T, the server's own count for the new request (taken on arrival, which
  is after the start) cannot include the old one.

With no limit at all (`rate=None`, "none" in the config) a ticket is handed out at once: no pacing,
no window, no request log (so the hooks are not called either); requests and those in flight are
still counted, and a 429 still pauses the key (for Retry-After, else _UNLIMITED_PAUSE_S).

A 429 (`throttle`) pauses the whole key until Retry-After (capped) and halves the pacing rate for a
few windows. A rejected key (`block`) stops every new request until `unblock`. `history` carries the
stamps of requests a previous process made (loop time; the store persists them through the
`on_request_started` / `on_request_done` hooks), so a restart does not spend them a second time.

Replicas sharing one key (`shared`, e.g. a ledger in PostgreSQL): once the local pacing and window
let a request start, `shared.take` must also give it a slot, counted across every replica by the
shared store's clock; if it refuses, the budget waits what it says (clamped, then asks again). The
slot's id is the ticket's `slot`; release calls `shared.done` (sent) or `shared.cancel` (never sent).
A 429 and a rejected key are passed on (`pause`, `block`/`unblock`), and a pause or block set by
another replica is honoured because `take` refuses. The shared calls are short and synchronous; a
StoreFault from them propagates, as one from the hooks does, after the local accounting is done.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Protocol

from aiolimiter import AsyncLimiter

from monitor.clock import Clock
from monitor.errors import StoreFault
from monitor.logs import get_logger
from monitor.rates import DEFAULT_RATE_LIMIT, RateLimit

log = get_logger(__name__)

_UNLIMITED_PAUSE_S = 1.0  # a 429 without Retry-After when there is no window to halve
_MIN_WAIT_S = 1e-6  # a stamp exactly T old still counts (the window is (now - T, now]): wait past it
_SHARED_MIN_WAIT_S = 0.005  # a refused shared take is asked again no sooner: each ask is a round trip

StartedHook = Callable[[float], object]  # stamp -> token (e.g. a row id)
DoneHook = Callable[[object, float | None], None]  # token, stamp (None: the ticket was never used)


class SharedSlots(Protocol):
    """The key's budget as other processes spend it too (see the module's docstring)."""

    def take(self, rate: RateLimit) -> tuple[int | None, float]:
        """(slot, 0.0) if a request may start now; else (None, seconds to wait before asking again)."""
        ...

    def done(self, slot: int) -> None: ...  # the answer came back

    def cancel(self, slot: int) -> None: ...  # never sent: free the slot

    def pause(self, seconds: float) -> None: ...  # a 429: every process waits

    def block(self, reason: str) -> None: ...  # the key was rejected

    def unblock(self) -> None: ...


class Ticket:
    """The right to make one request; give it back with `Budget.release`."""

    __slots__ = ("released", "slot", "started_at", "token")

    def __init__(self, started_at: float, token: object, slot: int | None = None) -> None:
        self.started_at = started_at
        self.token = token
        self.slot = slot  # the shared budget's slot, if any
        self.released = False


@dataclass(frozen=True, slots=True)
class BudgetStats:
    limit: int | None  # None: no limit
    window_s: float | None
    used: int  # requests in the current window, in flight included (no limit: in flight)
    free: int | None  # requests that could start now, as far as the window goes (None: no limit)
    in_flight: int
    paused_until: float | None  # loop time, while a 429 pause lasts
    slowed_until: float | None  # loop time, while the pacing rate is halved
    blocked: bool  # the key was rejected
    requests: int  # requests started since this budget was made
    throttles: int  # 429s reported


class Budget:
    """One per API key. `async with budget.spend(): ...` or `t = await budget.acquire(); ...; release(t)`."""

    def __init__(
        self,
        rate: RateLimit | None = DEFAULT_RATE_LIMIT,
        clock: Clock | None = None,
        *,
        history: Iterable[float] = (),
        throttle_cap_s: float = 300.0,
        slow_windows: float = 3.0,
        on_request_started: StartedHook | None = None,
        on_request_done: DoneHook | None = None,
        shared: SharedSlots | None = None,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._interval = 0.0 if rate is None else rate.window_s / rate.limit
        self._pacer = None if rate is None else AsyncLimiter(1, self._interval)
        self._stamps: deque[float] = deque(sorted(history))
        self._horizon_s = 0.0 if rate is None else rate.window_s  # how long stamps are kept (the longest window)
        self._in_flight = 0
        self._paused_until = -math.inf
        self._slowed_until = -math.inf
        self._last_start = -math.inf
        self._blocked = False
        self._throttle_cap_s = throttle_cap_s
        self._slow_windows = slow_windows
        self._on_started = on_request_started
        self._on_done = on_request_done
        self._shared = shared
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.requests = 0
        self.throttles = 0

    # -- time -------------------------------------------------------------------------------------

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock.now()
        return asyncio.get_running_loop().time()

    @property
    def rate_per_s(self) -> float:
        """The sustained rate this budget allows now (halved while slowed after a 429); inf: no limit."""
        if self.rate is None:
            return math.inf
        slow = self._slowed_until > self._now()
        return self.rate.per_second / (2.0 if slow else 1.0)

    # -- spending ---------------------------------------------------------------------------------

    async def acquire(self) -> Ticket:
        """Wait until one more request may start; the ticket counts as in flight until released."""
        async with self._lock:  # one waiter at a time: FIFO, and each sees the previous one's stamp
            if self._pacer is not None:
                await self._pacer.acquire()
            slot: int | None = None
            while True:
                wait = self._wait_needed(self._now())
                if wait is None and self._shared is not None and self.rate is not None:
                    slot, wait = self._take_shared(self._shared, self.rate)
                if wait is None:
                    break
                await self._sleep_or_change(wait)
            now = self._now()
            # Recorded first: if recording fails (the state store), nothing is counted or sent.
            try:
                token = self._on_started(now) if self._on_started is not None and self.rate is not None else None
            except BaseException:
                if slot is not None:
                    self._cancel_quietly(slot)
                raise
            self._in_flight += 1
            self._last_start = now
            self.requests += 1
            return Ticket(now, token, slot)

    @staticmethod
    def _take_shared(shared: SharedSlots, rate: RateLimit) -> tuple[int | None, float | None]:
        """(slot, None) once the shared budget gave one; else (None, how long to wait before asking again)."""
        slot, wait = shared.take(rate)  # a StoreFault propagates: nothing was counted here
        if slot is not None:
            return slot, None
        # Never longer than one local interval, so an unblock or a freed slot is seen soon.
        return None, min(max(wait, _SHARED_MIN_WAIT_S), rate.window_s / rate.limit)

    def _cancel_quietly(self, slot: int) -> None:
        if self._shared is not None:
            with suppress(StoreFault):  # the slot then counts until it expires: safe, only a bit slower
                self._shared.cancel(slot)

    def release(self, ticket: Ticket, *, used: bool = True) -> None:
        """The request is over (its answer, or its failure, came back). `used=False`: never sent."""
        if ticket.released:
            return
        ticket.released = True
        self._in_flight -= 1
        now = self._now()
        limited = self.rate is not None
        if not used:
            self.requests -= 1
        elif limited:
            self._stamps.append(now)
        try:
            if self._on_done is not None and limited:
                self._on_done(ticket.token, now if used else None)
            self._notify()
        finally:
            if ticket.slot is not None and self._shared is not None:  # last: the local accounting is done
                (self._shared.done if used else self._shared.cancel)(ticket.slot)

    @asynccontextmanager
    async def spend(self) -> AsyncIterator[Ticket]:
        ticket = await self.acquire()
        try:
            yield ticket
        finally:
            self.release(ticket)

    def _wait_needed(self, now: float) -> float | None:
        """None when a request may start now; else seconds to wait (inf: until something changes)."""
        if self._blocked:
            return math.inf
        if now < self._paused_until:
            return self._paused_until - now
        if self.rate is None:
            return None
        if now < self._slowed_until and now < self._last_start + 2 * self._interval:
            return self._last_start + 2 * self._interval - now
        return self._window_wait(now, self.rate)

    def _window_wait(self, now: float, rate: RateLimit) -> float | None:
        """The sliding-window part of `_wait_needed`: None, or seconds until a slot frees."""
        self._forget_before(now - self._horizon_s)
        window = rate.window_s
        first = bisect.bisect_right(self._stamps, now - window)  # stamps still inside (now - T, now]
        inside = len(self._stamps) - first
        excess = inside + self._in_flight - rate.limit + 1
        if excess <= 0:
            return None
        if excess > inside:
            return math.inf  # the window is full of requests in flight: wait for one to come back
        # The window frees up when the excess-th oldest stamp inside leaves it (stamp <= now - T).
        return max(self._stamps[first + excess - 1] + window - now, _MIN_WAIT_S)

    def _forget_before(self, horizon: float) -> None:
        stamps = self._stamps
        while stamps and stamps[0] <= horizon:
            stamps.popleft()

    async def _sleep_or_change(self, seconds: float) -> None:
        self._changed.clear()
        if math.isinf(seconds):
            await self._changed.wait()
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=seconds)

    def _notify(self) -> None:
        self._changed.set()

    def set_rate(self, rate: RateLimit | None) -> None:
        """A new limit (a config reload; None: no limit): pacing and the window check follow at once.

        The request log is kept for the longest window ever used, so a longer new window still
        counts the requests already made (none are logged while there is no limit).
        """
        self.rate = rate
        if rate is None:
            self._interval = 0.0
            self._pacer = None
        else:
            self._interval = rate.window_s / rate.limit
            self._pacer = AsyncLimiter(1, self._interval)
            self._horizon_s = max(self._horizon_s, rate.window_s)
        self._notify()

    # -- what the server said ----------------------------------------------------------------------

    def throttle(self, retry_after_s: float | None) -> None:
        """A 429: pause the whole key until Retry-After (capped; T/2 without one), then go slower.

        With no limit there is no pace to slow: only the pause (Retry-After, else _UNLIMITED_PAUSE_S)."""
        now = self._now()
        rate = self.rate
        if retry_after_s is None:
            retry_after_s = _UNLIMITED_PAUSE_S if rate is None else rate.window_s / 2
        pause = min(max(retry_after_s, 0.0), self._throttle_cap_s)
        self._paused_until = max(self._paused_until, now + pause)
        slowed_for = 0.0 if rate is None else self._slow_windows * rate.window_s
        if rate is not None:
            self._slowed_until = max(self._slowed_until, self._paused_until + slowed_for)
        self.throttles += 1
        log.warning("api key throttled", pause_s=round(pause, 3), slowed_for_s=slowed_for)
        self._notify()
        if self._shared is not None:
            self._shared.pause(pause)

    def block(self, reason: str = "key rejected") -> None:
        """The key was rejected: no request starts until `unblock` (in any replica, if shared)."""
        self._blocked = True
        self._notify()
        if self._shared is not None:
            self._shared.block(reason)

    def unblock(self) -> None:
        self._blocked = False
        self._notify()
        if self._shared is not None:
            self._shared.unblock()

    @property
    def blocked(self) -> bool:
        return self._blocked

    # -- what a live view or /metrics shows ---------------------------------------------------------

    def stats(self) -> BudgetStats:
        now = self._now()
        self._forget_before(now - self._horizon_s)
        rate = self.rate
        inside = 0 if rate is None else len(self._stamps) - bisect.bisect_right(self._stamps, now - rate.window_s)
        used = inside + self._in_flight
        return BudgetStats(
            limit=None if rate is None else rate.limit,
            window_s=None if rate is None else rate.window_s,
            used=used,
            free=None if rate is None else max(rate.limit - used, 0),
            in_flight=self._in_flight,
            paused_until=self._paused_until if self._paused_until > now else None,
            slowed_until=self._slowed_until if self._slowed_until > now else None,
            blocked=self._blocked,
            requests=self.requests,
            throttles=self.throttles,
        )

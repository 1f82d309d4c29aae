"""When to poll which execution: the vendor page's backoff loop, and the adaptive policy.

The scheduler takes a budget token first and only then asks `choose(now)` (late binding), so every
choice uses the freshest information. Choosing is O(log n): lazy-deletion heaps, never a scan.

backoff (the baseline)
    The vendor page's `poll_with_backoff`, run once per execution: the first poll at once, then
    gaps of 1 s, x1.5 each time, capped at 30 s: next_due = last_poll + delay. All executions share
    one budget, served FIFO by due time, so with more executions than the budget allows it
    degenerates into round robin: each is seen every N / R seconds (N tracked, R requests per
    second) and an end is noticed N / (2R) seconds late on average.

adaptive (the default; monitor/schedule/adaptive.py)
    Polls a predicted end when it is due, spends the other tokens in a hazard-weighted round robin,
    and keeps a floor. Each token goes, in this order, to:
    1. the floor: the execution polled longest ago, if that was at least
           F = alpha * P,  P = (N + L) / R      (alpha = floor_factor, default 1.3)
       ago. P = (N + L) / R is about the baseline's own round-robin period: N tracked, L those
       that left within the last F (largest fixed point), so F follows it while N shrinks.
       Failures and cancellations come without warning; F bounds their detection delay.
    2. a predicted end whose due time has come. With progress samples (p_i at t_i), a least-
       squares line through (tracked_since, 0) when plausible:
           p = b (t - t0),  eta = t0 + 100 / b,  sd = 100 s / (b^2 sqrt(sum (t_i - t0)^2))
       (otherwise p = a + b t, eta = (100 - a) / b, the smoothed form of Hadoop LATE's
       eta = t2 + (100 - p2) (t2 - t1) / (p2 - p1)); s is the residual noise shrunk toward
       2 points; 0 and 99 are clamped answers and left out. Progress never runs ahead of time
       by more than its noise, so each sample bounds the duration, D <= 100 (t_i - t0) / (p_i - 4),
       and eta = min(eta, t0 + that bound): runs that report at checkpoints lag behind any line
       and would be predicted late. An eta is used once some sample shows >= 10 % and
       sd <= 0.5 (eta - t0) (vaguer ones would only waste polls). The expected staleness of
       asking at t, for a run last seen going at L whose end is ~ N(eta, sd^2), is
           U(t) = E[(t - End)^+ | End > L]
                = [(t - eta)(Phi(b) - Phi(a)) + sd (phi(b) - phi(a))] / (1 - Phi(a)),
           a = (L - eta) / sd,  b = (t - eta) / sd,
       and the execution is due when U(t) = theta = kappa * P (kappa = 0.03, P = (N + L) / R):
       one threshold for all, as Olston and Pandey (WWW 2008) show is best for a fixed number
       of polls. After a poll at its due time that finds it still running ("a miss"), it
       waits at least retry_gap_min_s * retry_growth^misses (a run stuck at 99 % does not eat
       the budget).
    3. the round robin (a spare token): the smallest last_poll + P_i, with
           P_i = P * mean_j(sqrt(lambda_j)) / sqrt(lambda_i)
       (the square-root rule: poll rate proportional to the square root of the hazard). lambda is
       learned: for executions with progress, the rate of unexpected ends (failed, cancelled) per
       second of running; for those without, the rate of any end. So runs that may end at any
       moment come round more often than runs whose end is predicted far away; with one kind of
       execution it is plain round robin. An execution due before its floor deadline is skipped
       here: its predicted poll comes anyway.
    Polls at a predicted end replace the round-robin poll that would have found it ended, so only
    the misses cost the others; the floor caps what they may cost.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from monitor.records import Outcome
from monitor.schedule.state import ExecState, LazyHeap

POLICY_NAMES = ("adaptive", "backoff")
EPS = 1e-6  # seconds: comparisons of sums and differences may disagree in the last bit


class Policy(ABC):
    """The part of the scheduler that orders polls. Not thread-safe; one per scheduler."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._held = LazyHeap()
        self._count = 0
        self._rate: Callable[[], float] = lambda: 0.5

    def bind_rate(self, rate_per_s: Callable[[], float]) -> None:
        """Where the policy reads the budget's sustained rate (requests per second)."""
        self._rate = rate_per_s

    @property
    def count(self) -> int:
        return self._count

    # -- the scheduler's calls ------------------------------------------------------------------

    def add(self, state: ExecState, now: float) -> None:
        """A newly tracked (or restored) execution."""
        self._count += 1
        self._on_add(state, now)
        self._enqueue(state)

    def remove(self, state: ExecState, now: float) -> None:
        """Terminal or untracked: its heap entries go stale."""
        self._count -= 1
        state.ver += 1
        self._on_remove(state, now)

    def _on_remove(self, state: ExecState, now: float) -> None:  # noqa: B027  # optional hook
        """Something left the queue at `now`."""

    def hold(self, state: ExecState, until: float) -> None:
        """Poll it at `until` ahead of the cadence (error retry, 404 confirmation, a lost poll)."""
        state.ver += 1
        state.held_until = until
        self._held.push(until, state)

    def choose(self, now: float) -> ExecState | None:
        """The execution to spend a token on now, taken out of the queue; None: nothing worth it."""
        self._release_held(now)
        state = self._pick(now)
        if state is not None:
            state.ver += 1
        return state

    def ready_at(self, now: float) -> float:
        """The earliest time `choose` may return something (inf: not before something changes)."""
        held = self._held.top()
        return min(held[0] if held else math.inf, self._ready_at(now))

    def polled(self, state: ExecState, now: float) -> None:
        """It answered "running" at `now` (samples already recorded): schedule the next poll."""
        self._on_running(state, now)
        self._enqueue(state)

    def finished(self, state: ExecState, ended_at: float, outcome: Outcome) -> None:  # noqa: B027
        """It ended at about `ended_at` (loop time): something to learn from (optional hook)."""

    def _release_held(self, now: float) -> None:
        while (entry := self._held.top()) is not None and entry[0] <= now:
            self._held.pop()
            state = entry[1]
            state.due = entry[0]
            self._enqueue(state, urgent=True)

    # -- what each policy defines -------------------------------------------------------------------

    @abstractmethod
    def _on_add(self, state: ExecState, now: float) -> None: ...

    @abstractmethod
    def _on_running(self, state: ExecState, now: float) -> None: ...

    @abstractmethod
    def _enqueue(self, state: ExecState, *, urgent: bool = False) -> None:
        """Bump the version and push fresh heap entries for the state's current keys."""

    @abstractmethod
    def _pick(self, now: float) -> ExecState | None: ...

    @abstractmethod
    def _ready_at(self, now: float) -> float: ...


class BackoffPolicy(Policy):
    """The vendor page's poll_with_backoff per execution, FIFO by due time behind the shared budget."""

    name = "backoff"

    def __init__(self, initial_s: float = 1.0, factor: float = 1.5, max_s: float = 30.0) -> None:
        super().__init__()
        self.initial_s = initial_s
        self.factor = factor
        self.max_s = max_s
        self._due = LazyHeap()

    def _on_add(self, state: ExecState, now: float) -> None:
        if state.polls == 0 or state.delay <= 0:
            state.delay = self.initial_s
            state.due = now  # the page's loop asks at once
        else:  # restored: carry on where the previous process was
            state.due = state.last_poll + state.delay

    def _on_running(self, state: ExecState, now: float) -> None:
        state.due = now + state.delay
        state.delay = min(state.delay * self.factor, self.max_s)

    def _enqueue(self, state: ExecState, *, urgent: bool = False) -> None:
        state.ver += 1
        self._due.push(state.due, state)
        self._due.compact(self._count)

    def _pick(self, now: float) -> ExecState | None:
        top = self._due.top()
        if top is None or top[0] > now + EPS:
            return None
        self._due.pop()
        return top[1]

    def _ready_at(self, now: float) -> float:
        top = self._due.top()
        return top[0] if top else math.inf


def make_policy(name: str) -> Policy:
    """A policy by its configuration name ("adaptive" or "backoff")."""
    if name == "adaptive":
        from monitor.schedule.adaptive import AdaptivePolicy  # noqa: PLC0415  # it builds on this module

        return AdaptivePolicy()
    if name == "backoff":
        return BackoffPolicy()
    raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICY_NAMES)}")

"""When to poll which execution: the vendor page's backoff loop, and the adaptive policy.

The scheduler takes a budget token first and only then asks `choose(now)` (late binding), so every
choice uses the freshest information. Choosing is O(log n): lazy-deletion heaps, never a scan.

backoff (the baseline)
    The vendor page's `poll_with_backoff` run once per execution: first poll at once, then gaps of
    1 s, x1.5 each time, capped at 30 s: next_due = last_poll + delay. All executions share one
    budget, served FIFO by due time, so with more executions than the budget allows it degenerates
    into round robin: each one is seen every N / R seconds (N tracked, R requests per second) and a
    finish is noticed N / (2R) seconds late on average.

adaptive (the default)
    Spends the budget where a finish is most likely, with a floor so that nothing is starved.
    Each token goes, in this order, to:
    1. the floor: the execution polled longest ago, if that was at least
           F = max(floor_min_s, alpha * N / R)        (alpha = floor_factor, default 1.1)
       ago. F is the round-robin period N / R stretched by alpha, computed from the current N at
       every token (the heap is keyed by last-poll time, so N may change without re-keying).
       Failures and cancellations come without warning; the floor bounds their detection delay
       by F, about alpha times the baseline's worst case.
    2. a predicted finisher whose due time has come. For an execution that reports progress,
       a least-squares line p = a + b t through its samples, anchored at (tracked_since, 0) when
       plausible, gives
           eta = (100 - a) / b,   sd^2 = (s / b)^2 * (1/n + (eta - mean_t)^2 / Sxx)
       (the inverse prediction of the Hadoop-LATE estimator eta = t2 + (100 - p2)(t2 - t1)/(p2 - p1),
       smoothed over all samples; s is the residual noise shrunk toward 2 points) and
           due = eta + eta_margin * sd.
       After a poll past its eta that still says running ("a miss"), it re-estimates and retries
       after gap = max(retry_gap_min_s, retry_gap_sd * sd) * retry_growth^(misses - 1).
       For an execution with no progress (always 0), the empirical durations of completed ones
       give due = tracked_since + Q(q | age at last poll), the age by which a run still going at
       that age has ended with probability q (prior_quantile): polls concentrate where the
       empirical hazard of finishing is high.
    3. a spare token (nothing floor-overdue, nothing due): the stalest execution (round robin),
       which also banks floor time for busier moments.
    Polls at a predicted end replace floor polls rather than add to them, so the floor only costs
    budget for the executions whose end is far or unknown.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import ClassVar

from monitor.schedule.estimate import (
    Eta,
    anchor_is_plausible,
    fit_eta,
    fit_eta_origin,
    gaussian_crossing,
)
from monitor.schedule.hazard import AgeHazard
from monitor.schedule.state import ExecState, LazyHeap

POLICY_NAMES = ("adaptive", "backoff")
_EPS = 1e-6
_MIN_SD = 1.0  # seconds: no prediction is sharper than the clocks involved
_FLOOR_ITERATIONS = 8
_MAX_DEFERRALS = 8  # per token: keeps a choice O(log n) even when many are deferred


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
        self._on_remove(now)

    def _on_remove(self, now: float) -> None:  # noqa: B027  # optional hook
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

    def finished(self, state: ExecState, ended_at: float) -> None:  # noqa: B027  # optional hook
        """It completed at about `ended_at` (loop time): something to learn from."""

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
        if top is None or top[0] > now + _EPS:
            return None
        self._due.pop()
        return top[1]

    def _ready_at(self, now: float) -> float:
        top = self._due.top()
        return top[0] if top else math.inf


class AdaptivePolicy(Policy):
    """Floor + predicted finishes + spare round robin; see the module docstring for the formulas."""

    name = "adaptive"

    def __init__(
        self,
        *,
        floor_factor: float = 1.1,
        floor_min_s: float = 2.0,
        threshold_ratio: float = 0.01,
        retry_gap_min_s: float = 2.0,
        retry_growth: float = 1.5,
        refresh_z: float = 2.5,
        refresh_value: float = 0.5,
    ) -> None:
        super().__init__()
        self.floor_factor = floor_factor
        self.floor_min_s = floor_min_s
        self.threshold_ratio = threshold_ratio
        self.retry_gap_min_s = retry_gap_min_s
        self.retry_growth = retry_growth
        self.refresh_z = refresh_z
        self.refresh_value = refresh_value
        self._cycle = floor_min_s  # the last round-robin period (N + L) / R seen
        self._floor = LazyHeap()  # by last poll: the guarantee
        self._due = LazyHeap()  # by predicted due time
        self._spare = LazyHeap()  # round robin for spare tokens: by last poll, or by due when deferred
        self._hazard_all = AgeHazard()
        self._hazard_silent = AgeHazard()  # executions that never reported progress
        self._left: deque[float] = deque()  # when executions left the queue, over the last F

    def floor_interval(self, now: float) -> float:
        """F: no execution waits longer than this since its last poll (when the budget keeps up).

        F = alpha * (N + L) / R where L counts the executions that left within the last F: a round
        robin cycle that began before they left had to visit them too, so a shrinking N does not
        make everybody overdue at once. F is the largest fixed point, found from above.
        """
        rate = max(self._rate(), 1e-9)
        left = self._left
        scale = self.floor_factor / rate
        floor = max(self.floor_min_s, scale * (self._count + len(left)))
        while left and left[0] <= now - floor:
            left.popleft()  # older than any fixed point can reach
        for _ in range(_FLOOR_ITERATIONS):
            recent = len(left) - bisect.bisect_right(left, now - floor)
            smaller = max(self.floor_min_s, scale * (self._count + recent))
            if smaller >= floor - 1e-9:
                break
            floor = smaller
        self._cycle = floor / self.floor_factor
        return floor

    def _on_remove(self, now: float) -> None:
        self._left.append(now)

    # -- keys ------------------------------------------------------------------------------------

    def _on_add(self, state: ExecState, now: float) -> None:
        self._predict(state, now)

    def _on_running(self, state: ExecState, now: float) -> None:
        self._expose(state, now)
        if now >= state.eta - state.eta_sd:
            state.misses += 1  # asked where its end was expected, and it is still going
        self._predict(state, now)

    def threshold(self) -> float:
        """theta: the expected staleness at which a poll is worth a token (kappa times the cycle)."""
        return self.threshold_ratio * self._cycle

    def _predict(self, state: ExecState, now: float) -> None:
        """Set eta, eta_sd and due: when the expected staleness U(t) crosses theta."""
        # 0 and 99 are clamped values (the API reports 0-99 while running): censored, not samples.
        pairs = [(t, p) for t, p in state.sample_pairs() if 0 < p < 99]
        eta = None
        if pairs:
            if anchor_is_plausible(pairs, state.tracked_since):
                eta = fit_eta_origin(pairs, state.tracked_since)
            else:
                eta = fit_eta(pairs, None)
        last = state.last_poll
        if eta is None:
            state.eta = state.eta_sd = math.inf
            due = self._prior_due(state)
        else:
            state.eta, state.eta_sd = eta.at, eta.sd
            due = gaussian_crossing(self.threshold(), eta.at, max(eta.sd, _MIN_SD), last)
            due = min(due, self._refresh_at(state, eta, now))
        gap = self.retry_gap_min_s * self.retry_growth**state.misses
        state.due = max(due, now + gap)

    def _refresh_at(self, state: ExecState, eta: Eta, now: float) -> float:
        """A sample taken refresh_z sd before the end sharpens the prediction; worth a token when
        the delay it saves, refresh_value * (sd - sd_after), exceeds theta (inf: not worth it)."""
        at = eta.at - self.refresh_z * eta.sd
        progress_then = 100.0 * (at - state.tracked_since) / max(eta.at - state.tracked_since, 1e-9)
        if at <= now or progress_then <= 1.0:
            return math.inf
        sample_sd = (eta.at - state.tracked_since) * eta.noise / progress_then
        sd_after = 1.0 / math.sqrt(1.0 / eta.sd**2 + 1.0 / sample_sd**2)
        return at if self.refresh_value * (eta.sd - sd_after) > self.threshold() else math.inf

    def _prior_due(self, state: ExecState) -> float:
        """Without usable progress: when the expected staleness crosses theta, by age alone."""
        hazard = self._hazard_silent if _silent(state) and self._hazard_silent.ready else self._hazard_all
        if not hazard.ready:
            return math.inf
        return state.tracked_since + hazard.crossing(self.threshold(), state.last_poll - state.tracked_since)

    def _expose(self, state: ExecState, until: float) -> None:
        """Record that it was running from the last recorded moment up to `until` (loop time)."""
        start = state.exposed_to - state.tracked_since
        end = until - state.tracked_since
        if end > start:
            self._hazard_all.expose(start, end)
            if _silent(state):
                self._hazard_silent.expose(start, end)
            state.exposed_to = until

    def finished(self, state: ExecState, ended_at: float) -> None:
        self._expose(state, ended_at)
        age = ended_at - state.tracked_since
        self._hazard_all.event(age)
        if _silent(state):
            self._hazard_silent.event(age)

    def _enqueue(self, state: ExecState, *, urgent: bool = False) -> None:
        state.ver += 1
        self._floor.push(state.last_poll, state)
        self._spare.push(state.last_poll, state)
        if state.due < math.inf:
            self._due.push(state.due, state)
        for heap in (self._floor, self._spare, self._due):
            heap.compact(self._count)

    # -- choosing ---------------------------------------------------------------------------------

    def _pick(self, now: float) -> ExecState | None:
        now += _EPS  # ready_at's sums and these differences may disagree in the last bit
        floor = self.floor_interval(now)
        stalest = self._floor.top()
        if stalest is not None and stalest[0] <= now - floor:
            self._floor.pop()
            return stalest[1]
        due = self._due.top()
        if due is not None and due[0] <= now:
            self._due.pop()
            return due[1]
        return self._pick_spare(now, floor)

    def _pick_spare(self, now: float, floor: float) -> ExecState | None:
        """Round robin, except that an execution due before its floor deadline is deferred to its
        due time: its predicted poll will come anyway, so the token serves someone else."""
        for _ in range(_MAX_DEFERRALS):
            entry = self._spare.top()
            if entry is None or entry[0] > now - self.floor_min_s:
                return None
            state = entry[1]
            self._spare.pop()
            if now < state.due <= state.last_poll + floor and entry[0] < state.due:
                self._spare.push(state.due, state)  # same version: still a live entry
                continue
            return state
        return None

    def _ready_at(self, now: float) -> float:
        spare = self._spare.top()
        due = self._due.top()
        spare_at = spare[0] + self.floor_min_s if spare else math.inf
        return min(spare_at, due[0] if due else math.inf)


def _silent(state: ExecState) -> bool:
    """No sample has shown progress above 0 (yet)."""
    samples = state.samples
    return samples is None or all(samples[i] <= 0 for i in range(1, len(samples), 2))


def make_policy(name: str) -> Policy:
    """A policy by its configuration name ("adaptive" or "backoff")."""
    if name == "adaptive":
        return AdaptivePolicy()
    if name == "backoff":
        return BackoffPolicy()
    raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICY_NAMES)}")

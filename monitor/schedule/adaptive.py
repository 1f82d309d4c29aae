"""The adaptive policy: one shared staleness threshold, a heap of crossing times, and a floor.

See `monitor.schedule.policy` for the formulas in prose. In short, for every tracked execution:
- U(t) = expected staleness if we next ask at t = E[(t - End)^+ | End > last poll];
- due = the time U crosses theta; the heap gives the earliest crossing in O(log n);
- theta = lambda * P^2 / 2, the staleness a round robin of period P lets unexpected ends reach, so
  that round robin is the special case and whatever builds up staleness faster goes first;
- the floor: nobody waits longer than F = alpha * (N + L) / R since its last poll.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from monitor.records import Outcome
from monitor.schedule.estimate import (
    Eta,
    anchor_is_plausible,
    fit_eta,
    fit_eta_origin,
    staleness_crossing,
)
from monitor.schedule.hazard import AgeHazard
from monitor.schedule.policy import EPS, Policy
from monitor.schedule.state import ExecState, LazyHeap

_FLOOR_ITERATIONS = 8
_MIN_SD = 1.0  # seconds: no prediction is sharper than the clocks involved
_PRIOR_END_RATE = 1e-4  # per second: unexpected ends, before any were seen (one pseudo-event)


class AdaptivePolicy(Policy):
    """Polls each execution when its expected staleness crosses a shared, budget-driven threshold."""

    name = "adaptive"

    def __init__(
        self,
        *,
        floor_factor: float = 1.3,
        floor_min_s: float = 2.0,
        theta_factor: float = 1.0,
        theta_gain: float = 0.0,
        age_hazard: float = 0.0,
        retry_gap_min_s: float = 2.0,
        retry_growth: float = 1.5,
    ) -> None:
        super().__init__()
        self.floor_factor = floor_factor
        self.floor_min_s = floor_min_s
        self.theta_factor = theta_factor
        self.theta_gain = theta_gain
        self.age_hazard = age_hazard
        self._theta_scale = 1.0
        self._weights = 0.0  # sum over tracked executions of sqrt(hazard)
        self.retry_gap_min_s = retry_gap_min_s
        self.retry_growth = retry_growth
        self._cycle = floor_min_s  # the baseline's round-robin period (N + L) / R, last seen
        self._floor = LazyHeap()  # by last poll: the guarantee
        self._due = LazyHeap()  # by crossing time
        self._hazard_all = AgeHazard()  # ends (any outcome) by age, every execution
        self._hazard_silent = AgeHazard()  # the same, executions that never reported progress
        self._unexpected = 0  # failed or cancelled: ends that progress does not announce
        self._left: deque[float] = deque()  # when executions left, over the last F

    # -- the floor ---------------------------------------------------------------------------------

    def floor_interval(self, now: float) -> float:
        """F = alpha * (N + L) / R, L = executions that left within the last F (largest fixed point).

        A round-robin cycle that began before they left had to visit them too, so a shrinking N
        does not make everybody overdue at once; (N + L) / R is about the baseline's own cycle.
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

    def _on_remove(self, state: ExecState, now: float) -> None:
        self._left.append(now)
        self._weights = max(self._weights - state.weight, 0.0)
        state.weight = 0.0

    # -- learning ----------------------------------------------------------------------------------

    def end_rate(self) -> float:
        """Unexpected ends (failed, cancelled) per second of running: their hazard, lambda."""
        exposure = self._hazard_all.exposure + 1.0 / _PRIOR_END_RATE
        return (self._unexpected + 1.0) / exposure

    def _expose(self, state: ExecState, until: float) -> None:
        """Record that it was running from the last recorded moment up to `until` (loop time)."""
        start = state.exposed_to - state.tracked_since
        end = until - state.tracked_since
        if end > start:
            self._hazard_all.expose(start, end)
            if _silent(state):
                self._hazard_silent.expose(start, end)
            state.exposed_to = until

    def finished(self, state: ExecState, ended_at: float, outcome: Outcome) -> None:
        self._expose(state, ended_at)
        age = ended_at - state.tracked_since
        self._hazard_all.event(age)
        if _silent(state):
            self._hazard_silent.event(age)
        if outcome is not Outcome.COMPLETED:
            self._unexpected += 1

    @property
    def theta(self) -> float:
        """The expected staleness a token is worth: what a round robin lets a run reach,
        lambda * P^2 / 2 (P = the round-robin period), times theta_factor. A run with nothing
        but unexpected ends to fear then crosses exactly once per cycle: round robin is the
        special case, and whatever staleness builds up faster is served first."""
        rate = max(self._rate(), 1e-9)
        stretch = self._cycle * rate / max(self._count, 1)  # (N + L) / N: those that just left
        return self._theta_scale * self.theta_factor * (self._weights * stretch / rate) ** 2 / 2.0

    # -- keys ------------------------------------------------------------------------------------

    def _on_add(self, state: ExecState, now: float) -> None:
        self._predict(state, now)

    def _on_running(self, state: ExecState, now: float) -> None:
        self._expose(state, now)
        if now >= state.eta - state.eta_sd:
            state.misses += 1  # asked where its end was expected, and it is still going
        self._predict(state, now)

    def _predict(self, state: ExecState, now: float) -> None:
        """Set eta, eta_sd and due: when the expected staleness U(t) crosses theta."""
        eta = _estimate(state)
        last = state.last_poll
        rate = self.end_rate()
        theta = self.theta
        if eta is not None:
            state.eta, state.eta_sd = eta.at, eta.sd
            due = staleness_crossing(theta, last, rate, eta.at, max(eta.sd, _MIN_SD))
        else:
            state.eta = state.eta_sd = math.inf
            hazard = self._hazard_silent if _silent(state) and self._hazard_silent.ready else self._hazard_all
            if hazard.ready and self.age_hazard:
                age = last - state.tracked_since
                rate = hazard.rate_at(age)
                due = state.tracked_since + hazard.crossing(theta, age)
            else:
                if hazard.ready:
                    rate = (hazard.events + 1.0) / (hazard.exposure + 1.0 / _PRIOR_END_RATE)
                due = staleness_crossing(theta, last, rate, None, 0.0)
        weight = math.sqrt(rate)
        self._weights = max(self._weights + weight - state.weight, 0.0)
        state.weight = weight
        gap = self.retry_gap_min_s * self.retry_growth**state.misses
        state.due = max(due, now + gap)

    def _enqueue(self, state: ExecState, *, urgent: bool = False) -> None:
        state.ver += 1
        self._floor.push(state.last_poll, state)
        self._due.push(state.due, state)
        self._floor.compact(self._count)
        self._due.compact(self._count)

    # -- choosing ---------------------------------------------------------------------------------

    def _pick(self, now: float) -> ExecState | None:
        now += EPS  # ready_at's sums and these differences may disagree in the last bit
        stalest = self._floor.top()
        if stalest is not None and stalest[0] <= now - self.floor_interval(now):
            self._floor.pop()
            return stalest[1]
        top = self._due.top()
        if top is None:
            return None
        if self.theta_gain:
            step = 1.0 + self.theta_gain if top[0] <= now else 1.0 / (1.0 + self.theta_gain)
            self._theta_scale = min(max(self._theta_scale * step, 1e-3), 1e6)
        # A spare token takes the earliest crossing even before it is due.
        if top[0] <= now or now - top[1].last_poll >= self.floor_min_s:
            self._due.pop()
            return top[1]
        return None

    def _ready_at(self, now: float) -> float:
        at = math.inf
        stalest = self._floor.top()
        if stalest is not None:
            at = stalest[0] + self.floor_interval(now)
        top = self._due.top()
        if top is not None:
            at = min(at, top[0], top[1].last_poll + self.floor_min_s)
        return at


def _estimate(state: ExecState) -> Eta | None:
    """The end predicted from its progress samples, or None without usable progress."""
    # 0 and 99 are clamped values (the API reports 0-99 while running): censored, not samples.
    pairs = [(t, p) for t, p in state.sample_pairs() if 0 < p < 99]
    if not pairs:
        return None
    if anchor_is_plausible(pairs, state.tracked_since):
        return fit_eta_origin(pairs, state.tracked_since)
    return fit_eta(pairs, None)


def _silent(state: ExecState) -> bool:
    """No sample has shown progress above 0 (yet)."""
    samples = state.samples
    return samples is None or all(samples[i] <= 0 for i in range(1, len(samples), 2))

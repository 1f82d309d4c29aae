"""When to poll which execution: the vendor page's backoff loop, and the adaptive policy.

The scheduler takes a budget token first and only then asks `choose(now)` (late binding), so every
choice uses the freshest information. Choosing is O(log n): lazy-deletion heaps, never a scan.

The [polling] settings initial_interval_s, backoff_factor and max_interval_s reach both policies
through `make_policy`; their defaults are the vendor page's 1 s, x1.5 and 30 s.

backoff (the baseline)
    The vendor page's `poll_with_backoff`, run once per execution: the first poll at once, then
    gaps of initial_interval_s, x backoff_factor each time, capped at max_interval_s:
    next_due = last_poll + delay. All executions share one budget, served FIFO by due time, so
    with more executions than the budget allows it degenerates into round robin: each is seen
    every N / R seconds (N tracked, R requests per second) and an end is noticed N / (2R)
    seconds late on average.

adaptive (the default; monitor/schedule/adaptive.py)
    Polls a predicted end when it is due, spends the other tokens in a hazard-weighted round robin,
    and keeps a floor. Each token goes, in this order, to a predicted end whose due time has come
    (2: each backs off after a miss, so they are few), a stall check (few too), the floor (1), and
    the round robin (3):
    1. the floor: the execution polled longest ago, if that was at least
           F = max(g, alpha * P),  P = (N + L) / R      (alpha = floor_factor, default 1.1)
       ago. P = (N + L) / R is about the baseline's own round-robin period: N tracked, L those
       that left within the last F (largest fixed point), so F follows it while N shrinks.
       g = min(max(initial_interval_s, 2 s), max_interval_s) is the shortest gap between two
       polls of one execution (an answer fresher than 2 s rarely has news). So every execution
       is polled at least every max_interval_s as far as the budget allows while keeping 10 %
       for predicted ends (alpha * P <= max_interval_s), and at least every alpha * P otherwise;
       the policy spends every token, so a larger max_interval_s has nothing to relax.
       Failures and cancellations come without warning; F bounds their detection delay, so
       alpha is the most a run waits past the baseline's cycle: where nothing can be predicted
       its p99 stays within 1.1x the baseline's (1.3 let a silent population reach 1.24x; on
       seeds 1000-1004 the means were the same at 1.1 and 1.15, once ends came from the grid).
    2. a predicted end whose due time has come. With progress samples (p_i at t_i), a least-
       squares line through (tracked_since, 0) when plausible:
           p = b (t - t0),  eta = t0 + 100 / b,  sd = 100 s / (b^2 sqrt(sum (t_i - t0)^2))
       (otherwise p = a + b t, eta = (100 - a) / b, the smoothed form of Hadoop LATE's
       eta = t2 + (100 - p2) (t2 - t1) / (p2 - p1)); s is the residual noise shrunk toward
       2 points; 0 and 99 are clamped answers and left out. Samples are stamped with
       `updated_at`; t0 is the later of tracked_since and the last poll that still saw 0 % (a
       queue). The anchor is plausible unless the free line's zero crossing lies more than
       3 standard errors (+ 30 s) before tracked_since (a run handed over late). Progress never
       runs ahead of its line by more than its noise but may lag (checkpoints, a change of step
       that moved updated_at): samples more than 1.5 noise units below the anchored line are left out and
       it is fitted again (a majority is always kept), and each sample bounds the duration,
       D <= 100 (t_i - t0) / (p_i - 4), eta = min(eta, t0 + that bound). Per `kind` label the
       policy learns from completed runs (start = end - metadata.execution_time): the log run
       time (a prior b ~ N(100 / D, ...) on the slope, used in the anchored fit and for runs whose
       start is unknown) and the bend k of p = 100 f^k (the median of the last 31 runs' own
       least-squares k of log p on log f, shrunk toward 1); samples are straightened,
       p -> 100 (p / 100)^(1/k), before any fit. An eta is used once some sample shows >= 10 % and
       sd <= 0.5 (eta - t0) (vaguer ones would only waste polls). The expected staleness of
       asking at t, for a run last seen going at L whose end is ~ N(eta, sd^2), is
           U(t) = E[(t - End)^+ | End > L]
                = [(t - eta)(Phi(b) - Phi(a)) + sd (phi(b) - phi(a))] / (1 - Phi(a)),
           a = (L - eta) / sd,  b = (t - eta) / sd,
       and the execution is due when U(t) = theta = min(kappa * P, sd) (kappa = 0.03,
       P = (N + L) / R): one threshold for all, as Olston and Pandey (WWW 2008) show is best for
       a fixed number of polls, except that an end known to within less than theta is polled
       just after it (about one poll either way; waiting for theta would only add theta to the
       delay). Such ends come from `updated_at` (`monitor.schedule.lattice`): a run moving at a
       steady pace changes its whole-number progress every tau = D / 100 seconds, so its stamps
       lie on a grid of step tau, found to the millisecond once three of them agree; then
       eta = t0 + 100 tau (sd 1 s) for a run seen from its start, or the line of slope 1 / tau
       through the readings otherwise. After a poll at its due time that finds it still running
       ("a miss"), it waits at least g * backoff_factor^misses (a run stuck at 99 % does not eat
       the budget).
    3. the round robin (a spare token): the smallest last_poll + P_i, with
           P_i = P * mean_j(sqrt(lambda_j)) / sqrt(lambda_i)
       (the square-root rule: poll rate proportional to the square root of the hazard). lambda is
       learned: for executions with progress, the rate of unexpected ends (failed, cancelled) per
       second of running (also while their progress is too small to predict from); for those
       without, the rate of any end (by age per kind once learned). So runs that may end at any
       moment come round more often than runs whose end is predicted far away; with one kind of
       execution it is plain round robin. An execution due before its floor deadline is skipped
       here: its predicted poll comes anyway; one polled less than g ago is never taken.
    Polls at a predicted end replace the round-robin poll that would have found it ended, so only
    the misses cost the others; the floor caps what they may cost.
    Stalls (`monitor.schedule.stalls`): after 2 and before the floor, a run that looked frozen at
    its last poll (half way to its stall threshold) is polled when it would cross the threshold
    (behind the floor, a floor burst held these for a round-robin period: stall records 19 / 137 /
    186 s late at p50 / p90 / max on `stalls`, against 1 / 3 / 4 s); a stalled run's round-robin
    period is P_i / 2. Runs that keep moving are never affected.
"""

from __future__ import annotations

import math

from monitor.schedule.adaptive import AdaptivePolicy
from monitor.schedule.base import (
    DEFAULT_BACKOFF_FACTOR,
    DEFAULT_INITIAL_INTERVAL_S,
    DEFAULT_MAX_INTERVAL_S,
    EPS,
    Policy,
    PolicyName,
)
from monitor.schedule.state import ExecState, LazyHeap

__all__ = ["POLICY_NAMES", "BackoffPolicy", "Policy", "make_policy"]  # Policy: for the scheduler

POLICY_NAMES = tuple(name.value for name in PolicyName)


class BackoffPolicy(Policy):
    """The vendor page's poll_with_backoff per execution, FIFO by due time behind the shared budget."""

    name = "backoff"

    def __init__(
        self,
        initial_interval_s: float = DEFAULT_INITIAL_INTERVAL_S,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        max_interval_s: float = DEFAULT_MAX_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.initial_interval_s = initial_interval_s
        self.backoff_factor = backoff_factor
        self.max_interval_s = max_interval_s
        self._due = LazyHeap()

    def _on_add(self, state: ExecState, now: float) -> None:
        if state.polls == 0 or state.delay <= 0:
            state.delay = self.initial_interval_s
            state.due = now  # the page's loop asks at once
        else:  # restored: carry on where the previous process was, within this process's cap
            state.delay = min(state.delay, self.max_interval_s)
            state.due = state.last_poll + state.delay

    def _on_running(self, state: ExecState, now: float) -> None:
        state.due = now + state.delay
        state.delay = min(state.delay * self.backoff_factor, self.max_interval_s)

    def _enqueue(self, state: ExecState) -> None:
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


def make_policy(
    name: str,
    *,
    initial_interval_s: float = DEFAULT_INITIAL_INTERVAL_S,
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
    max_interval_s: float = DEFAULT_MAX_INTERVAL_S,
) -> Policy:
    """A policy by its configuration name ("adaptive" or "backoff"), with the [polling] intervals."""
    if not 0 < initial_interval_s <= max_interval_s or backoff_factor < 1:
        raise ValueError(
            "expected 0 < initial_interval_s <= max_interval_s and backoff_factor >= 1, found "
            f"{initial_interval_s:g}, {max_interval_s:g} and {backoff_factor:g}"
        )
    if name == "adaptive":
        return AdaptivePolicy(
            initial_interval_s=initial_interval_s, backoff_factor=backoff_factor, max_interval_s=max_interval_s
        )
    if name == "backoff":
        return BackoffPolicy(initial_interval_s, backoff_factor, max_interval_s)
    raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICY_NAMES)}")

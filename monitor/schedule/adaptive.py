"""The adaptive policy: predicted ends first, a hazard-weighted round robin with the rest, a floor.

The formulas are in `monitor.schedule.policy`'s docstring. Four heaps with lazy deletion, each
O(log n) per operation, so a choice never scans the tracked executions:
- due: by the time the expected staleness of a predicted end crosses theta = min(kappa * P, sd);
  these go first (a poll at a predicted end replaces a later one, and misses back off);
- floor: by last poll; an execution not polled for F = max(g, alpha * (N + L) / R) goes next;
- round robin: by last poll + its own period P_i = P * mean(sqrt(lambda)) / sqrt(lambda_i), so
  executions that can end at any moment (no progress) come round more often than those whose
  end is predicted far away; with one kind of execution it is plain round robin. A stalled
  execution (`monitor.schedule.stalls`) comes round STALLED_BOOST times as often as its peers.
- checks: a run that has not changed since well before its last poll is polled again when it would
  cross its stall threshold, if nothing else comes first, so that a stall is reported when it
  happens rather than up to a round-robin period later (a run that keeps moving never gets there).
Updating an execution after an answer is O(samples + log n): at most 12 samples are kept.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from monitor.records import Outcome
from monitor.schedule.base import (
    DEFAULT_BACKOFF_FACTOR,
    DEFAULT_INITIAL_INTERVAL_S,
    DEFAULT_MAX_INTERVAL_S,
    EPS,
    Policy,
)
from monitor.schedule.durations import AgeTable, Durations
from monitor.schedule.estimate import (
    MIN_NOISE,
    PRIOR_NOISE,
    PRIOR_NOISE_WEIGHT,
    Eta,
    Shapes,
    anchor_is_plausible,
    fit_eta,
    fit_eta_origin_lagging,
    fit_eta_prior,
    free_slope,
    gaussian_crossing,
    straighten,
)
from monitor.schedule.lattice import STAMP_TOL_S, WHOLE_SECOND_S, step_bounds, step_time
from monitor.schedule.state import ExecState, LazyHeap

_FLOOR_ITERATIONS = 8
_MAX_DEFERRALS = 8  # per token: keeps a choice O(log n) even when many are deferred
_MIN_SD = 1.0  # seconds: no prediction is sharper than the clocks involved
MIN_REL_SD = 0.02  # a progress fit's relative error is never taken as smaller when looking for a grid
_PRIOR_RATE = 1e-4  # ends per second of running, before any were seen (one pseudo-event)
_PRIOR_SD_LOG = 0.7  # spread of log run times assumed before the runs of a kind say otherwise
_MIN_EVENTS = 5  # ends of silent executions needed before their own rate is used
MIN_GAP_S = 2.0  # an answer fresher than this rarely has news: the token serves another execution
STALLED_BOOST = 2.0  # a stalled execution comes round in the round robin this many times as often


class _Ends:
    """Ends seen and seconds of running observed: their ratio is a hazard rate."""

    __slots__ = ("events", "exposure")

    def __init__(self) -> None:
        self.events = 0
        self.exposure = 0.0


class _LogStats:
    """Count, mean and sum of squared deviations of log run times (Welford)."""

    __slots__ = ("m2", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def merge(self, n: int, mean: float, m2: float) -> None:
        """Pool another set's (n, mean, m2) into this one (Chan et al.)."""
        total = self.n + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total

    def slope_prior(self) -> tuple[float, float] | None:
        """(b0, sd) of the progress slope 100 / D (points per second), once a few runs ended."""
        if self.n < _MIN_EVENTS:
            return None
        sd_log = math.sqrt((self.m2 + _PRIOR_SD_LOG**2 * 2.0) / (self.n - 1 + 2.0))
        b0 = 100.0 / math.exp(self.mean)
        return b0, b0 * max(sd_log, 0.1)


class AdaptivePolicy(Policy):
    """Polls predicted ends when due, everything else in a hazard-weighted round robin."""

    name = "adaptive"

    def __init__(
        self,
        *,
        initial_interval_s: float = DEFAULT_INITIAL_INTERVAL_S,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        max_interval_s: float = DEFAULT_MAX_INTERVAL_S,
        floor_factor: float = 1.1,
        kappa: float = 0.03,
        max_rel_sd: float = 0.5,
        min_progress: float = 10.0,
    ) -> None:
        super().__init__()
        # g: the shortest gap between two polls of one execution and the floor's least value; the
        # wait before a predicted end is g * backoff_factor**misses. Never above max_interval_s, so
        # the floor keeps that promise wherever the budget allows.
        self.min_gap_s = min(max(initial_interval_s, MIN_GAP_S), max_interval_s)
        self.retry_growth = backoff_factor
        self.floor_factor = floor_factor
        self.kappa = kappa
        self.max_rel_sd = max_rel_sd
        self.min_progress = min_progress
        self._cycle = self.min_gap_s  # the baseline's round-robin period (N + L) / R, last seen
        self._floor = LazyHeap()  # by last poll: the guarantee
        self._due = LazyHeap()  # by crossing time of a predicted end
        self._checks = LazyHeap()  # by the moment an unchanged run would cross its stall threshold
        self._round = LazyHeap()  # by last poll + own period (deferred: by due)
        self._all = _Ends()  # every execution
        self._silent = _Ends()  # executions that never reported progress
        self._unexpected = 0  # failed or cancelled ends: no progress announces them
        self._weights = 0.0  # sum over tracked executions of sqrt(hazard)
        self._left: deque[float] = deque()  # when executions left, over the last F
        self.durations = Durations()  # ends by age per kind label (see export_learning)
        self._runs: dict[str | None, _LogStats] = {}  # log run times of completed runs, per kind
        self._shapes: dict[str | None, Shapes] = {}  # the bend of progress curves, per kind

    # -- what it learned, for a restart ------------------------------------------------------------

    def export_learning(self) -> dict[str, object]:
        """Run times learned per kind, JSON-able (ages only): hand it to `import_learning` later."""
        return {
            "durations": self.durations.export(),
            "runs": [{"kind": k, "n": r.n, "mean": r.mean, "m2": r.m2} for k, r in self._runs.items()],
            "shapes": [{"kind": k, "k": v.export()} for k, v in self._shapes.items()],
        }

    def import_learning(self, data: object) -> None:
        """Start informed: merge what `export_learning` gave (malformed parts are ignored)."""
        if not isinstance(data, dict):
            return
        self.durations.load(data.get("durations"))
        for kind, item in _items(data.get("runs")):
            n, mean, m2 = _finite(item.get("n")), _finite(item.get("mean")), _finite(item.get("m2"))
            if n is not None and n >= 1 and n == int(n) and mean is not None and m2 is not None and m2 >= 0:
                self._runs.setdefault(kind, _LogStats()).merge(int(n), mean, m2)
        for kind, item in _items(data.get("shapes")):
            self._shapes.setdefault(kind, Shapes()).load(item.get("k"))

    # -- the floor ---------------------------------------------------------------------------------

    def floor_interval(self, now: float) -> float:
        """F = max(g, alpha * (N + L) / R), L = executions that left within the last F (largest fixed point).

        (N + L) / R is about the baseline's own round-robin cycle: a cycle that began before they
        left had to visit them too, so a shrinking N does not make everybody overdue at once.
        """
        rate = max(self._rate(), 1e-9)
        left = self._left
        scale = self.floor_factor / rate
        floor = max(self.min_gap_s, scale * (self._count + len(left)))
        while left and left[0] <= now - floor:
            left.popleft()  # older than any fixed point can reach
        for _ in range(_FLOOR_ITERATIONS):
            recent = len(left) - bisect.bisect_right(left, now - floor)
            smaller = max(self.min_gap_s, scale * (self._count + recent))
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

    def unexpected_rate(self) -> float:
        """lambda_f: failed or cancelled ends per second of running (progress does not warn of them)."""
        return (self._unexpected + 1.0) / (self._all.exposure + 1.0 / _PRIOR_RATE)

    def silent_rate(self) -> float:
        """lambda_s: ends of any kind per second of running, for executions without progress."""
        ends = self._silent if self._silent.events >= _MIN_EVENTS else self._all
        return (ends.events + 1.0) / (ends.exposure + 1.0 / _PRIOR_RATE)

    def _expose(self, state: ExecState, until: float) -> None:
        """Count the running time from the last recorded moment up to `until` (loop time)."""
        seconds = until - state.exposed_to
        if seconds > 0:
            self._all.exposure += seconds
            self.durations.table(_kind(state)).expose(
                state.exposed_to - state.tracked_since, until - state.tracked_since
            )
            if _silent(state):
                self._silent.exposure += seconds
            state.exposed_to = until

    def finished(self, state: ExecState, ended_at: float, outcome: Outcome, run_s: float | None = None) -> None:
        self._expose(state, ended_at)
        if outcome is Outcome.COMPLETED and run_s is not None:
            self._runs.setdefault(_kind(state), _LogStats()).add(math.log(run_s))
            self._shapes.setdefault(_kind(state), Shapes()).add_run(state.sample_pairs(), ended_at - run_s, run_s)
        self._all.events += 1
        self.durations.table(_kind(state)).end(ended_at - state.tracked_since)
        if _silent(state):
            self._silent.events += 1
        if outcome is not Outcome.COMPLETED:
            self._unexpected += 1

    # -- keys ------------------------------------------------------------------------------------

    def _on_add(self, state: ExecState, now: float) -> None:
        self._predict(state, now)

    def _on_running(self, state: ExecState, now: float) -> None:
        self._expose(state, now)
        if math.isfinite(state.eta) and now >= state.due - EPS:
            state.misses += 1  # asked because its end was due, and it is still going
        if state.progress == 0 and _silent(state) and _unchanged_since_tracked(state, now):
            state.zero_at = now  # still waiting (a queue): the run started after this
        self._predict(state, now)

    def _predict(self, state: ExecState, now: float) -> None:
        """Set eta, due (inf without a prediction) and the hazard weight."""
        stats = self._runs.get(_kind(state))
        shapes = self._shapes.get(_kind(state))
        shape = 1.0 if shapes is None else shapes.shape()
        eta = _estimate(state, None if stats is None else stats.slope_prior(), shape)
        if eta is not None and (
            eta.sd > self.max_rel_sd * max(eta.at - state.tracked_since, 0.0)
            or max(p for _, p in state.sample_pairs()) < self.min_progress
        ):
            eta = None  # too vague to act on: the round robin will bring a better sample
        if eta is not None:
            state.eta = eta.at
            sd = max(eta.sd, _MIN_SD)
            theta = min(self.kappa * self._cycle, sd)
            due = gaussian_crossing(theta, eta.at, sd, state.last_poll)
            gap = self.min_gap_s * self.retry_growth**state.misses
            state.due = max(due, now + gap)
            hazard = self.unexpected_rate()
        else:
            state.eta = state.due = math.inf
            table = self._learned(state)
            if not _silent(state):
                # Progress, but too little or too vague to predict from: it is early in its run, and
                # only an unannounced failure can end it soon (not the rate of silent runs' ends).
                hazard = self.unexpected_rate()
            elif table is None:
                hazard = self.silent_rate()
            else:
                hazard = table.weight(now - state.tracked_since) ** 2
        weight = math.sqrt(hazard)
        self._weights = max(self._weights + weight - state.weight, 0.0)
        state.weight = weight

    def _period(self, state: ExecState) -> float:
        """Its round-robin period: P * mean(sqrt(lambda)) / sqrt(lambda_i), divided by STALLED_BOOST
        while it is stalled (it is likely to fail or resume: its news is worth more than a peer's)."""
        period = self._cycle
        if state.weight > 0.0 and self._count > 0:
            period = self._cycle * (self._weights / self._count) / state.weight
        return period / STALLED_BOOST if state.stall_key is not None else period

    def _learned(self, state: ExecState) -> AgeTable | None:
        """Its kind's age table, once enough of that kind have ended; only for runs without progress."""
        if not _silent(state):
            return None
        table = self.durations.tables.get(_kind(state))
        return table if table is not None and table.events >= _MIN_EVENTS else None

    def _round_key(self, state: ExecState) -> float:
        """last poll + its period; without progress, the square-root rule at its age: the next poll
        when the integral of sqrt(hazard(age)) since the last one reaches P * mean_j(sqrt(lambda_j))."""
        table = self._learned(state) if math.isinf(state.due) else None
        if table is None or self._count <= 0:
            return state.last_poll + self._period(state)
        unit = self._cycle * self._weights / self._count
        limit = 4.0 * self._cycle * self.floor_factor
        return state.last_poll + table.next_poll(state.last_poll - state.tracked_since, unit, limit)

    def _enqueue(self, state: ExecState) -> None:
        state.ver += 1
        self._floor.push(state.last_poll, state)
        self._round.push(self._round_key(state), state)
        if state.due < math.inf:
            self._due.push(state.due, state)
        if state.check_at < math.inf:
            self._checks.push(max(state.check_at, state.last_poll + self.min_gap_s), state)
        for heap in (self._floor, self._due, self._checks, self._round):
            heap.compact(self._count)

    # -- choosing ---------------------------------------------------------------------------------

    def _pick(self, now: float) -> ExecState | None:
        now += EPS  # ready_at's sums and these differences may disagree in the last bit
        floor = self.floor_interval(now)
        # Predicted ends, then stall checks (a run crossing its stall threshold: a record is due
        # then), before the floor: both are few, and a floor burst would hold them for a period.
        for heap in (self._due, self._checks):
            entry = heap.top()
            if entry is not None and entry[0] <= now:
                heap.pop()
                return entry[1]
        stalest = self._floor.top()
        if stalest is not None and stalest[0] <= now - floor:
            self._floor.pop()
            return stalest[1]
        return self._pick_round(now, floor)

    def _pick_round(self, now: float, floor: float) -> ExecState | None:
        """A spare token: round robin, except that an execution due before its floor deadline is
        deferred to its due time (its predicted poll will come anyway; the token serves another)."""
        for _ in range(_MAX_DEFERRALS):
            entry = self._round.top()
            if entry is None:
                return None
            state = entry[1]
            if now - state.last_poll < self.min_gap_s:
                return None
            self._round.pop()
            if now < state.due <= state.last_poll + floor and entry[0] < state.due:
                self._round.push(state.due, state)  # same version: still a live entry
                continue
            return state
        return None

    def _ready_at(self, now: float) -> float:
        at = math.inf
        for heap in (self._due, self._checks):
            entry = heap.top()
            if entry is not None:
                at = min(at, entry[0])
        entry = self._round.top()
        if entry is not None:
            at = min(at, entry[1].last_poll + self.min_gap_s)
        return at


def _estimate(state: ExecState, prior: tuple[float, float] | None = None, shape: float = 1.0) -> Eta | None:
    """The end predicted from its progress samples, or None without usable progress.

    `shape`: its kind's learned bend k (progress = 100 f**k); samples are straightened first. A
    line through the samples, sharpened by the grid of its `updated_at` stamps when they have one
    (`monitor.schedule.lattice`)."""
    # 0 and 99 are clamped values (the API reports 0-99 while running): censored, not samples.
    every = state.sample_pairs()
    pairs = [(t, straighten(p, shape)) for t, p in every if 0 < p < 99]
    if not pairs:
        return None
    # The run started when it was tracked, or later: the last answer at 0 % says when at the latest
    # it was still waiting (the poll's time; its updated_at: when it left the queue, if it did).
    first = pairs[0][0]
    zero = [state.tracked_since] + [t for t, p in every if p <= 0 and t < first]
    if state.zero_at < first:
        zero.append(state.zero_at)
    origin = max(zero)
    eta, anchored = _line(pairs, origin, prior)
    if eta is None:
        return None
    # The grid's end is only as good as its start: the latest moment known to be before it (a 0 %
    # reading's stamp may be a step after the start, and a late start predicts a late end).
    start = max(state.tracked_since, state.zero_at)
    tol = state.stamp_tol or STAMP_TOL_S
    return _on_grid(pairs, eta, start if anchored else None, state.last_poll - every[-1][0], tol) or eta


def _line(
    pairs: list[tuple[float, float]], origin: float, prior: tuple[float, float] | None
) -> tuple[Eta | None, bool]:
    """The line's end, and whether it goes through (origin, 0) (the run started then)."""
    if prior is not None and pairs[0][1] > 3.0 * prior[0] * (pairs[0][0] - origin) + 3.0 * PRIOR_NOISE:
        return fit_eta_prior(pairs, *prior), False  # far ahead of any run of its kind: started before it was tracked
    if not anchor_is_plausible(pairs, origin):
        return (fit_eta(pairs) if prior is None else fit_eta_prior(pairs, *prior)), False
    eta = fit_eta_origin_lagging(pairs, origin, prior)
    if eta is None:
        return None, False
    if prior is not None and eta.slope < prior[0] * math.exp(-2.0 * prior[1] / prior[0]) and len(pairs) >= 2:
        # Far slower than runs of its kind from the moment it was tracked: it waited before it
        # started (a queue at 0 %), and the anchor would predict late.
        return fit_eta_prior(pairs, *prior), False
    # Progress never runs ahead of time by more than its noise: each sample bounds the duration,
    # D <= 100 (t - t0) / (p - 2 s). Runs that report at checkpoints lag behind the line, and the
    # fit then predicts late; the bound catches that.
    margin = 3.0 * PRIOR_NOISE  # not the residuals: a staircase has large ones, its noise need not
    bound = min(
        (100.0 * (t - origin) / (p - margin) for t, p in pairs if p > margin + 5.0 and t > origin),
        default=math.inf,
    )
    if bound > 0 and origin + bound < eta.at:
        return Eta(at=origin + bound, sd=eta.sd, slope=100.0 / bound), True
    return eta, True


def _on_grid(
    pairs: list[tuple[float, float]], eta: Eta, low: float | None, unchanged_s: float, tol: float = STAMP_TOL_S
) -> Eta | None:
    """The end from the step time of its `updated_at` grid, or None when the stamps have none.

    `low`: a moment the run had not started before (its handover, or its last poll at 0 %), when
    the line through it was plausible. The readings say the start too: a stamp u of reading p
    gives u - p tau, noisy by tau s / sqrt(n). That is half a step early on average (the level
    changed at its own step and is read half a step later, whether the server rounds or
    truncates), on purpose: an early poll costs one poll, a late one costs the whole lateness
    (on late-handover seeds 1000-1004 the unbiased u - (p - 0.5) tau gave 0.29 against 0.25).
    The end is start + 100 tau: from `low` (sd 1 s) unless the readings put the start well
    after it (a wait in a queue).

    `tol`: how far a difference of two stamps may be from the true one (STAMP_TOL_S for
    milliseconds; WHOLE_SECOND_S when the server cuts them to the second, which also leaves tau
    known only to a range: its width widens the end's sd, and the stamps are half a second early
    on average)."""
    stamps = [t for t, _ in pairs]
    base = stamps[0] if low is None else low
    rel_sd = max(eta.sd / max(eta.at - base, 1.0), MIN_REL_SD)
    tau = step_time(stamps, 1.0 / eta.slope, rel_sd, tol)
    if tau is None and low is not None:
        free = free_slope(pairs)  # the anchor may be far from the start (a queue): a slope without it
        if free is not None:
            tau = step_time(stamps, 1.0 / free[0], max(free[1] / free[0], MIN_REL_SD), tol)
    if tau is None or unchanged_s > 2.0 * tau + tol:
        return None  # no grid, or it stood still for longer than its steps: not a steady pace
    end_sd = _MIN_SD
    cut = 0.0  # how early a stamp is on average
    if tol >= WHOLE_SECOND_S:
        tau_low, tau_high = step_bounds(stamps, tau, tol)
        tau = (tau_low + tau_high) / 2.0
        end_sd = max(end_sd, 100.0 * (tau_high - tau_low) / math.sqrt(12.0))  # uniform over the range
        cut = tol / 2.0
    starts = [t + cut - p * tau for t, p in pairs]
    n = len(starts)
    start = sum(starts) / n
    spread = sum((x - start) ** 2 for x in starts) / tau**2
    noise = math.sqrt((spread + PRIOR_NOISE_WEIGHT * PRIOR_NOISE**2) / (n - 1 + PRIOR_NOISE_WEIGHT))
    sd = max(tau * max(noise, MIN_NOISE) / math.sqrt(n), end_sd)
    if low is not None:
        if start < low - 3.0 * sd - 3.0 * PRIOR_NOISE * tau:
            return None  # far ahead of a run started at `low`: the grid is too coarse a guess
        if start <= low + 3.0 * sd:
            return Eta(at=low + 100.0 * tau, sd=end_sd, slope=1.0 / tau)
    return Eta(at=start + 100.0 * tau, sd=sd, slope=1.0 / tau)


def _items(data: object) -> list[tuple[str | None, dict[str, object]]]:
    """(kind, dict) for each dict of an exported list whose "kind" is a string or None."""
    out: list[tuple[str | None, dict[str, object]]] = []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict):
            kind = item.get("kind")
            if kind is None or isinstance(kind, str):
                out.append((kind, item))
    return out


def _finite(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def _kind(state: ExecState) -> str | None:
    labels = state.labels
    return labels.get("kind") if labels else None


def _unchanged_since_tracked(state: ExecState, now: float) -> bool:
    """The last answer's `updated_at` is no later than the handover (or there was none): nothing has
    moved yet. A reading of 0 % with a later stamp is a run that has started (the noise of a few
    per cent read as 0, or its first step): it bounds the start from above, not from below."""
    samples = state.samples
    if not samples:
        return True
    stamp = samples[-2]
    return stamp <= state.tracked_since + STAMP_TOL_S or stamp >= now - STAMP_TOL_S


def _silent(state: ExecState) -> bool:
    """No sample has shown progress above 0 (yet)."""
    samples = state.samples
    return samples is None or all(samples[i] <= 0 for i in range(1, len(samples), 2))

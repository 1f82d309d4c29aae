"""Estimators for the adaptive policy: when will an execution end?

- `fit_eta`: a least-squares line through the progress samples, solved for progress = 100, with
  the standard error of that inverse prediction; `fit_eta_origin`: the same line through
  (tracked_since, 0), for runs the monitor saw start (`anchor_is_plausible`).
- `gaussian_overshoot` / `gaussian_crossing`: the expected staleness of a run last seen going at
  L whose end is ~ N(eta, sd^2), U(t) = E[(t - End)^+ | End > L] (how late we would be, on
  average, if we asked at t), and when it reaches a threshold theta. Polling when U crosses one
  shared theta is the best use of a fixed number of polls (Olston and Pandey, WWW 2008).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PRIOR_NOISE = 2.0  # progress points: assumed noise until the residuals say otherwise
PRIOR_NOISE_WEIGHT = 2.0  # pseudo degrees of freedom behind PRIOR_NOISE
MIN_NOISE = 0.5  # progress is an integer: rounding alone is +-0.5
LAG_CUT = 1.5  # noise units below the line from which a sample counts as lagging (checkpoints)


@dataclass(frozen=True, slots=True)
class Eta:
    at: float  # predicted loop time at which progress reaches 100
    sd: float  # one standard deviation of that prediction (seconds)
    slope: float  # progress points per second


def fit_eta(samples: Sequence[tuple[float, float]]) -> Eta | None:
    """Least squares `p = a + b t` over the samples.

    eta = (100 - a) / b; its variance (inverse prediction, delta method) is
    (s / b)^2 * (1/n + (eta - mean_t)^2 / Sxx), with s the residual noise shrunk toward
    PRIOR_NOISE. None when no progress is being made (b <= 0) or the times do not spread.
    """
    points = list(samples)
    n = len(points)
    if n < 2:
        return None
    t_ref = points[0][0]  # centre the times for numerical comfort
    mean_t = sum(t - t_ref for t, _ in points) / n
    mean_p = sum(p for _, p in points) / n
    sxx = sum((t - t_ref - mean_t) ** 2 for t, _ in points)
    if sxx <= 1e-9:
        return None
    sxy = sum((t - t_ref - mean_t) * (p - mean_p) for t, p in points)
    slope = sxy / sxx
    if slope <= 1e-12:
        return None
    intercept = mean_p - slope * mean_t
    eta_rel = (100.0 - intercept) / slope
    sse = sum((p - intercept - slope * (t - t_ref)) ** 2 for t, p in points)
    dof = n - 2
    noise_sq = (sse + PRIOR_NOISE_WEIGHT * PRIOR_NOISE**2) / (dof + PRIOR_NOISE_WEIGHT)
    noise = max(math.sqrt(noise_sq), MIN_NOISE)
    var = (noise / slope) ** 2 * (1.0 / n + (eta_rel - mean_t) ** 2 / sxx)
    return Eta(at=t_ref + eta_rel, sd=math.sqrt(var), slope=slope)


def free_slope(samples: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(b, sd of b) of the least-squares line `p = a + b t`, with the noise shrunk as in `fit_eta`;
    None without three samples or a positive slope."""
    n = len(samples)
    if n < 3:
        return None
    mean_t = sum(t for t, _ in samples) / n
    mean_p = sum(p for _, p in samples) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in samples)
    if sxx <= 1e-9:
        return None
    slope = sum((t - mean_t) * (p - mean_p) for t, p in samples) / sxx
    if slope <= 1e-12:
        return None
    sse = sum((p - mean_p - slope * (t - mean_t)) ** 2 for t, p in samples)
    noise_sq = (sse + PRIOR_NOISE_WEIGHT * PRIOR_NOISE**2) / (n - 2 + PRIOR_NOISE_WEIGHT)
    return slope, max(math.sqrt(noise_sq), MIN_NOISE) / math.sqrt(sxx)


def fit_eta_prior(samples: Sequence[tuple[float, float]], b0: float, sd_b0: float) -> Eta | None:
    """Least squares `p = a + b t` with a prior b ~ N(b0, sd_b0^2) on the slope (from the run times of
    its kind), for runs whose start is unknown: one sample already gives an end, more sharpen it.

    b = (Sxy / s^2 + b0 / sd_b0^2) / (Sxx / s^2 + 1 / sd_b0^2), eta = mean_t + (100 - mean_p) / b,
    var(eta) = (s^2 / n + r^2 var(b)) / b^2 with r = 100 - mean_p.
    """
    points = list(samples)
    n = len(points)
    if n < 1 or b0 <= 0 or sd_b0 <= 0:
        return None
    t_ref = points[0][0]
    mean_t = sum(t - t_ref for t, _ in points) / n
    mean_p = sum(p for _, p in points) / n
    sxx = sum((t - t_ref - mean_t) ** 2 for t, _ in points)
    sxy = sum((t - t_ref - mean_t) * (p - mean_p) for t, p in points)
    slope_guess = sxy / sxx if sxx > 1e-9 else b0
    sse = sum((p - mean_p - slope_guess * (t - t_ref - mean_t)) ** 2 for t, p in points)
    noise_sq = (sse + PRIOR_NOISE_WEIGHT * PRIOR_NOISE**2) / (max(n - 2, 0) + PRIOR_NOISE_WEIGHT)
    noise_sq = max(noise_sq, MIN_NOISE**2)
    precision = sxx / noise_sq + 1.0 / sd_b0**2
    slope = (sxy / noise_sq + b0 / sd_b0**2) / precision
    if slope <= 1e-12:
        return None
    rest = max(100.0 - mean_p, 0.0)
    var = (noise_sq / n + rest**2 / precision) / slope**2
    return Eta(at=t_ref + mean_t + rest / slope, sd=math.sqrt(var), slope=slope)


def fit_eta_origin(samples: Sequence[tuple[float, float]], origin: float) -> Eta | None:
    """Least squares through (origin, 0): p = b (t - origin); eta = origin + 100 / b.

    One parameter instead of two: much sharper when the run really started at `origin`
    (the monitor saw it start). sd(eta) = 100 s / (b^2 sqrt(sum x^2)).
    """
    sxx = sum((t - origin) ** 2 for t, _ in samples)
    if sxx <= 1e-9:
        return None
    slope = sum((t - origin) * p for t, p in samples) / sxx
    if slope <= 1e-12:
        return None
    n = len(samples)
    sse = sum((p - slope * (t - origin)) ** 2 for t, p in samples)
    noise_sq = (sse + PRIOR_NOISE_WEIGHT * PRIOR_NOISE**2) / (n - 1 + PRIOR_NOISE_WEIGHT)
    noise = max(math.sqrt(noise_sq), MIN_NOISE)
    sd = 100.0 * noise / (slope**2 * math.sqrt(sxx))
    return Eta(at=origin + 100.0 / slope, sd=sd, slope=slope)


def fit_eta_origin_lagging(
    samples: Sequence[tuple[float, float]],
    origin: float,
    prior: tuple[float, float] | None = None,
    cut: float = LAG_CUT,
) -> Eta | None:
    """`fit_eta_origin` for progress that may lag behind its line but never runs ahead of it.

    A run that reports at checkpoints, or whose `updated_at` moved for a change of step while its
    progress stood still, gives samples below the line p = b (t - origin), never above it (beyond
    the noise). Samples more than `cut` noise units below the current line are left out and the
    line is fitted again (every sample is tested again each time, so a point can come back); the
    noise is estimated from the kept ones; at least half of the samples are kept (when most of them
    would lag, the run rather started before `origin`). A few rounds: O(samples). With `prior` = (b0, sd_b0), the
    slope of runs of its kind, b = (Sxy / s^2 + b0 / sd_b0^2) / (Sxx / s^2 + 1 / sd_b0^2): a few
    low samples cannot make a run ten times longer than any of its kind.
    """
    points = list(samples)
    kept = points
    eta = _fit_origin_prior(kept, origin, prior)
    for _ in range(4):
        if eta is None:
            return None
        slope = eta.slope
        floor = -cut * _origin_noise(kept, origin, slope)
        again = [(t, p) for t, p in points if p - slope * (t - origin) >= floor]
        if 2 * len(again) < len(points) or again == kept:
            break  # most samples "lag": the anchor is wrong (an earlier start), not the samples
        kept = again
        eta = _fit_origin_prior(kept, origin, prior)
    return eta


def _origin_noise(samples: Sequence[tuple[float, float]], origin: float, slope: float) -> float:
    sse = sum((p - slope * (t - origin)) ** 2 for t, p in samples)
    noise_sq = (sse + PRIOR_NOISE_WEIGHT * PRIOR_NOISE**2) / (len(samples) - 1 + PRIOR_NOISE_WEIGHT)
    return max(math.sqrt(noise_sq), MIN_NOISE)


def _fit_origin_prior(
    samples: Sequence[tuple[float, float]], origin: float, prior: tuple[float, float] | None
) -> Eta | None:
    eta = fit_eta_origin(samples, origin)
    if eta is None or prior is None:
        return eta
    b0, sd_b0 = prior
    noise_sq = _origin_noise(samples, origin, eta.slope) ** 2
    sxx = sum((t - origin) ** 2 for t, _ in samples)
    sxy = sum((t - origin) * p for t, p in samples)
    precision = sxx / noise_sq + 1.0 / sd_b0**2
    slope = (sxy / noise_sq + b0 / sd_b0**2) / precision
    if slope <= 1e-12:
        return None
    sd = 100.0 / slope**2 / math.sqrt(precision)  # delta method on eta = origin + 100 / b
    return Eta(at=origin + 100.0 / slope, sd=sd, slope=slope)


class Shapes:
    """The bend of a kind's progress curve, learned from its completed runs: p = 100 f**k of the run
    fraction f. A completed run says when it started (its end minus `metadata.execution_time`) and
    how long it ran, so each of its samples gives f; k of one run is the least-squares slope of
    log(p / 100) on log f through the origin, weighted by p^2 (the noise of log p is noise / p).
    The kind's k is the median of its last runs' (a stalled run, whose run time includes the stall,
    cannot pull it far), shrunk toward 1 (a straight line) while few runs have ended.
    """

    __slots__ = ("recent",)

    KEEP = 31  # runs per kind remembered
    MIN_RUNS = 5  # before a kind's own bend is used
    LOW, HIGH = 0.2, 5.0  # a run whose own k falls outside is not a curve of this family

    def __init__(self) -> None:
        self.recent: list[float] = []

    def add_run(self, samples: Sequence[tuple[float, float]], start: float, run_s: float) -> float | None:
        """Learn from one completed run's (time, progress) samples; its k, or None if it says nothing."""
        sxy = sxx = 0.0
        count = 0
        for t, p in samples:
            f = (t - start) / run_s
            if not (0 < p < 99 and 0.02 < f < 0.98):
                continue
            w = (p / 100.0) ** 2
            lf = math.log(f)
            sxy += w * lf * math.log(p / 100.0)
            sxx += w * lf * lf
            count += 1
        if count < 2 or sxx <= 1e-9:
            return None
        k = sxy / sxx
        if not self.LOW <= k <= self.HIGH:
            return None
        self.recent.append(k)
        if len(self.recent) > self.KEEP:
            del self.recent[0]
        return k

    def shape(self) -> float:
        """k: 1 until MIN_RUNS runs have been seen, then their median in log space shrunk toward 1."""
        n = len(self.recent)
        if n < self.MIN_RUNS:
            return 1.0
        ordered = sorted(self.recent)
        middle = ordered[n // 2] if n % 2 else math.sqrt(ordered[n // 2 - 1] * ordered[n // 2])
        return math.exp(math.log(middle) * n / (n + 2.0))

    def export(self) -> list[float]:
        return [round(k, 4) for k in self.recent]

    def load(self, data: object) -> None:
        if isinstance(data, list):
            good = [float(k) for k in data if isinstance(k, int | float) and not isinstance(k, bool)]
            self.recent = ([k for k in good if self.LOW <= k <= self.HIGH] + self.recent)[-self.KEEP :]


def straighten(progress: float, shape: float) -> float:
    """Progress on a curve 100 f**shape turned back into the straight line 100 f."""
    if shape == 1.0 or progress <= 0:
        return progress
    return float(100.0 * (progress / 100.0) ** (1.0 / shape))


def anchor_is_plausible(samples: Sequence[tuple[float, float]], tracked_since: float) -> bool:
    """False when the samples show the execution started well before it was tracked.

    Anchoring at (tracked_since, 0) sharpens the slope a lot when the monitor saw the start,
    and biases it when it did not (an ID added while already half done). The free line's zero
    crossing x0 = mean_t - mean_p / b has the standard error (s / b) sqrt(1/n + (x0 - mean_t)^2 / Sxx)
    (as `fit_eta`'s inverse prediction): the anchor is dropped when x0 is more than 3 of those, and
    30 s for the clocks, before tracked_since.
    """
    points = list(samples)
    n = len(points)
    if n < 2:
        return True  # nothing to contradict it; the usual case is a run tracked from its start
    t_ref = points[0][0]
    mean_t = sum(t - t_ref for t, _ in points) / n
    mean_p = sum(p for _, p in points) / n
    sxx = sum((t - t_ref - mean_t) ** 2 for t, _ in points)
    if sxx <= 1e-9:
        return True
    slope = sum((t - t_ref - mean_t) * (p - mean_p) for t, p in points) / sxx
    if slope <= 1e-12:
        return True
    zero_rel = mean_t - mean_p / slope
    sse = sum((p - mean_p - slope * (t - t_ref - mean_t)) ** 2 for t, p in points)
    noise_sq = (sse + PRIOR_NOISE_WEIGHT * PRIOR_NOISE**2) / (n - 2 + PRIOR_NOISE_WEIGHT)
    se = math.sqrt(noise_sq) / slope * math.sqrt(1.0 / n + (zero_rel - mean_t) ** 2 / sxx)
    return t_ref + zero_rel >= tracked_since - 3.0 * se - 30.0


def _cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _pdf(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def gaussian_overshoot(t: float, mu: float, sd: float, lower: float) -> float:
    """E[(t - E)^+ | E > lower] for an end time E ~ N(mu, sd^2) known to be after `lower`."""
    if t <= lower:
        return 0.0
    a = (lower - mu) / sd
    b = (t - mu) / sd
    tail = 1.0 - _cdf(a)
    if tail < 1e-9:
        return t - lower  # far past anything the model expected: it may end any moment
    inside = (t - mu) * (_cdf(b) - _cdf(a)) + sd * (_pdf(b) - _pdf(a))
    return max(inside / tail, 0.0)


def gaussian_crossing(theta: float, mu: float, sd: float, lower: float) -> float:
    """The earliest t > lower with gaussian_overshoot(t) >= theta (it increases with t; bisection)."""
    low = lower
    step = max(sd, 1.0)
    high = max(lower, mu) + step
    while gaussian_overshoot(high, mu, sd, lower) < theta:
        low, high = high, high + step
        step *= 2.0
    tolerance = max(0.1, 0.005 * sd)
    while high - low > tolerance:
        middle = (low + high) / 2.0
        if gaussian_overshoot(middle, mu, sd, lower) >= theta:
            high = middle
        else:
            low = middle
    return high

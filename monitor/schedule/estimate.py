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


def anchor_is_plausible(samples: Sequence[tuple[float, float]], tracked_since: float) -> bool:
    """False when the samples show the execution started well before it was tracked.

    Anchoring at (tracked_since, 0) sharpens the slope a lot when the monitor saw the start,
    and biases it when it did not (an ID added while already half done).
    """
    if len(samples) < 2:
        return True  # nothing to contradict it; the usual case is a run tracked from its start
    free = fit_eta(samples)
    if free is None:
        return True
    span = samples[-1][0] - tracked_since
    zero_at = free.at - 100.0 / free.slope  # where the free line says progress was 0
    return zero_at >= tracked_since - 0.2 * span - 30.0


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

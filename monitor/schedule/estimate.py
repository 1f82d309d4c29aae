"""Estimators for the adaptive policy: when will an execution end?

- `fit_eta`: a least-squares line through the progress samples, anchored at (tracked_since, 0),
  solved for progress = 100, with the standard error of that inverse prediction.
- `DurationPrior`: the empirical distribution of durations seen so far, for executions that report
  no progress, queried as "given it is still running at age a, by which age has it ended with
  probability q?".
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

PRIOR_NOISE = 2.0  # progress points: assumed noise until the residuals say otherwise
PRIOR_NOISE_WEIGHT = 2.0  # pseudo degrees of freedom behind PRIOR_NOISE
MIN_NOISE = 0.5  # progress is an integer: rounding alone is +-0.5
MAX_PRIOR_SAMPLES = 4096


@dataclass(frozen=True, slots=True)
class Eta:
    at: float  # predicted loop time at which progress reaches 100
    sd: float  # one standard deviation of that prediction (seconds)
    slope: float  # progress points per second


def fit_eta(samples: Sequence[tuple[float, float]], anchor: float | None) -> Eta | None:
    """Least squares `p = a + b t` over the samples (and the anchor (anchor, 0) when given).

    eta = (100 - a) / b; its variance (inverse prediction, delta method) is
    (s / b)^2 * (1/n + (eta - mean_t)^2 / Sxx), with s the residual noise shrunk toward
    PRIOR_NOISE. None when no progress is being made (b <= 0) or the times do not spread.
    """
    points = list(samples)
    if anchor is not None:
        points.append((anchor, 0.0))
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


def anchor_is_plausible(samples: Sequence[tuple[float, float]], tracked_since: float) -> bool:
    """False when the samples show the execution started well before it was tracked.

    Anchoring at (tracked_since, 0) sharpens the slope a lot when the monitor saw the start,
    and biases it when it did not (an ID added while already half done).
    """
    if len(samples) < 3:
        return samples[0][1] <= 50.0 if samples else True
    free = fit_eta(samples, None)
    if free is None:
        return True
    span = samples[-1][0] - tracked_since
    zero_at = free.at - 100.0 / free.slope  # where the free line says progress was 0
    return zero_at >= tracked_since - 0.2 * span - 30.0


class DurationPrior:
    """Durations (seconds from tracking to end) of completed executions, kept sorted."""

    __slots__ = ("_durations",)

    def __init__(self) -> None:
        self._durations: list[float] = []

    def __len__(self) -> int:
        return len(self._durations)

    def add(self, duration_s: float) -> None:
        durations = self._durations
        if len(durations) >= MAX_PRIOR_SAMPLES:
            # Forget every other one: keeps the shape, halves the size, O(n) once per n additions.
            del durations[::2]
        bisect.insort(durations, max(duration_s, 0.0))

    def conditional_quantile(self, age_s: float, q: float) -> float | None:
        """The age by which a run still going at `age_s` has ended with probability q (None: no data)."""
        durations = self._durations
        first_longer = bisect.bisect_right(durations, age_s)
        remaining = len(durations) - first_longer
        if remaining <= 0:
            return None
        index = first_longer + max(math.ceil(q * remaining) - 1, 0)
        return durations[index]

    def survival(self, age_s: float) -> float:
        """Fraction of seen durations longer than age_s (1.0 with no data)."""
        durations = self._durations
        if not durations:
            return 1.0
        return 1.0 - bisect.bisect_right(durations, age_s) / len(durations)

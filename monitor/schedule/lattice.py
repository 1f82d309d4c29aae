"""The step time of progress that moves at a steady pace, read from `updated_at` alone.

A run whose progress grows linearly in time and is shown as a whole number changes its shown
value every tau = D / 100 seconds, and `updated_at` is the server's time of the last change (the
noise on the reported number is the reading's, not the job's). So any two `updated_at` stamps of
such a run are a whole number of steps apart: u_j - u_i = k_ij * tau, to the stamps' resolution.
The noisy progress says tau only to a few per cent; the stamps say it to milliseconds once their
step counts are unambiguous, which makes a run's end known to about a second instead of tens.

`step_time` finds that tau: the first and last stamps, S apart, allow k in a narrow range around
S / tau0; a candidate tau = S / k is kept when every other stamp also falls on its grid. A run that
is not linear (curves, checkpoints, a stall in between) fits no candidate, or several, and gets
None: the caller keeps its usual estimate.

A server that sends whole seconds (as the vendor's page shows `updated_at`) cuts each change to
the second below it, so two stamps are k tau apart to within a second: the same search with that
tolerance finds k when steps are several seconds long, and `step_bounds` then narrows tau to the
values that put every stamp's true moment in its second (to about 1 s / k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

STAMP_TOL_S = 0.004  # stamps come in milliseconds: a difference of two is exact to 1 ms, plus float error
WHOLE_SECOND_S = 1.0  # stamps cut to the second: a difference of two is within 1 s of the true one
MIN_STAMPS = 3  # the pair that proposes tau, and at least one more that confirms it
MAX_CANDIDATES = 64  # step counts tried per estimate: keeps it O(samples) with a small constant
MAX_REL_SD = 0.15  # beyond this the range of k could hold tau / 2 or 2 tau: no answer
# Steps shorter than this many tolerances: too many grids fit by chance.
MIN_STEP_IN_TOLS = 20.0
MIN_STEP_IN_SECONDS = 4.0  # whole-second stamps


def step_time(stamps: Sequence[float], tau0: float, rel_sd: float, tol: float = STAMP_TOL_S) -> float | None:
    """tau such that every stamp, or all but one, lies on one grid of step tau; None when no grid or
    several fit.

    `tau0`: the step time the progress fit gives (1 / slope), `rel_sd` its relative standard error;
    candidates lie within 3 of those. One stamp may be off the grid: a change of `current_step`
    between two progress steps moves `updated_at` too. At least MIN_STAMPS must be on it.
    """
    points = sorted(set(stamps))
    if len(points) < MIN_STAMPS or tau0 <= 0 or not 0 <= rel_sd <= MAX_REL_SD:
        return None
    taus = _grids(points, tau0, rel_sd, tol, allowed_off=0)
    if not taus and len(points) > MIN_STAMPS:
        # One stamp off: an inner one (the grid of the first and last), or the first, or the last.
        for subset, off in ((points, 1), (points[1:], 0), (points[:-1], 0)):
            for tau in _grids(subset, tau0, rel_sd, tol, allowed_off=off):
                if all(abs(tau - other) * len(points) > tol for other in taus):
                    taus.append(tau)
    return taus[0] if len(taus) == 1 else None


def _grids(points: list[float], tau0: float, rel_sd: float, tol: float, *, allowed_off: int) -> list[float]:
    """Every tau near tau0 on whose grid (through the first and last of the sorted, distinct points)
    all the points lie but at most `allowed_off` inner ones."""
    first, span = points[0], points[-1] - points[0]
    k_low = max(math.ceil(span / (tau0 * (1.0 + 3.0 * rel_sd))), 1)
    k_high = math.floor(span / (tau0 * max(1.0 - 3.0 * rel_sd, 1e-9)))
    min_step = tol * (MIN_STEP_IN_SECONDS if tol >= WHOLE_SECOND_S else MIN_STEP_IN_TOLS)
    if k_high < k_low or k_high - k_low >= MAX_CANDIDATES or min_step * k_high > span:
        return []  # too vague, or steps too short for the stamps' resolution
    found = []
    inner = points[1:-1]
    for k in range(k_low, k_high + 1):
        tau = span / k
        off = 0
        for u in inner:
            if not _on_grid(u - first, tau, tol):
                off += 1
                if off > allowed_off:
                    break
        if off <= allowed_off:
            found.append(tau)
    return found


def _on_grid(offset: float, tau: float, tol: float) -> bool:
    steps = offset / tau
    return abs(steps - round(steps)) * tau <= tol


def step_bounds(stamps: Sequence[float], tau: float, tol: float) -> tuple[float, float]:
    """The step times that keep every stamp on `tau`'s grid to within `tol` (stamps cut to whole
    seconds: each true moment lies in [u, u + 1)). Each stamp's step count from the first and to
    the last bounds tau; a stamp off the grid (see `step_time`) is left out. (tau, tau) when the
    bounds disagree."""
    points = sorted(set(stamps))
    first, last = points[0], points[-1]
    total = round((last - first) / tau)
    low, high = 0.0, math.inf
    for u in points:
        for gap in (u - first, last - u):
            steps = round(gap / tau)
            if steps > 0 and abs(gap - steps * tau) <= tol:
                low, high = max(low, (gap - tol) / steps), min(high, (gap + tol) / steps)
    if total <= 0 or not low <= tau <= high:
        return tau, tau
    return low, high

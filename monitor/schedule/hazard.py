"""How likely an execution is to end at a given age, learned from the executions seen so far.

For executions that report no progress, the only guide is age. `AgeHazard` estimates a
piecewise-constant hazard of ending (any outcome) over log-spaced age bins, from events (ends)
and exposure (seconds that executions were seen running at each age). Counting exposure makes it
censoring-aware: executions still running count for the ages they reached, so long runs are not
forgotten just because they have not ended yet (an estimate from finished runs alone would
believe every run is short, early on).

`crossing(theta, age)` answers: for a run last seen running at `age`, at which age x does its
expected staleness U(x) = E[(x - D)^+ | D > age] reach theta? With hazard h on a bin and
conditional survival c at the bin's start, U grows over the bin by d - c (1 - e^(-h d)) / h.
"""

from __future__ import annotations

import math

BINS_PER_DOUBLING = 4
MAX_BIN = 4 * 24  # 2^24 s (194 days); the last bin is open-ended
MIN_EVENTS = 5  # ends needed before the estimate is used
_NEVER_S = 1e8  # a crossing this far away means never


def _bin(age: float) -> int:
    if age < 1.0:
        return 0
    index = min(int(math.log2(age) * BINS_PER_DOUBLING) + 1, MAX_BIN)
    # log2 may round just below a bin edge: make sure `age` is below the bin's upper edge.
    while index < MAX_BIN and _edge(index + 1) <= age:
        index += 1
    return index


def _edge(index: int) -> float:
    """Lower edge of a bin (bin 0 covers ages below 1 s)."""
    return 0.0 if index == 0 else 2.0 ** ((index - 1) / BINS_PER_DOUBLING)


class AgeHazard:
    __slots__ = ("_events", "_exposure", "events", "exposure")

    def __init__(self) -> None:
        self._events = [0.0] * (MAX_BIN + 1)
        self._exposure = [0.0] * (MAX_BIN + 1)
        self.events = 0
        self.exposure = 0.0

    def expose(self, from_age: float, to_age: float) -> None:
        """Runs were seen going from `from_age` to `to_age`."""
        low = max(from_age, 0.0)
        while low < to_age:
            index = _bin(low)
            high = to_age if index == MAX_BIN else min(to_age, _edge(index + 1))
            self._exposure[index] += high - low
            self.exposure += high - low
            low = high

    def event(self, age: float) -> None:
        self._events[_bin(age)] += 1.0
        self.events += 1

    @property
    def ready(self) -> bool:
        return self.events >= MIN_EVENTS

    def rate(self, index: int) -> float:
        """Smoothed hazard on a bin: one bin-width of pseudo-exposure at the overall rate."""
        overall = self.events / max(self.exposure, 1e-9)
        width = _edge(index + 1) - _edge(index) if index < MAX_BIN else _edge(index)
        return (self._events[index] + width * overall) / (self._exposure[index] + width)

    def rate_at(self, age: float) -> float:
        return self.rate(_bin(age))

    def crossing(self, theta: float, age: float) -> float:
        """The age at which the expected staleness since `age` reaches theta."""
        staleness = 0.0
        survival = 1.0  # S(x) / S(age)
        low = max(age, 0.0)
        index = _bin(low)
        while True:
            rate = self.rate(index)
            high = math.inf if index == MAX_BIN else _edge(index + 1)
            gain = _growth(high - low, rate, survival)
            if staleness + gain >= theta or index == MAX_BIN:
                return low + _solve(theta - staleness, rate, survival, high - low)
            staleness += gain
            survival *= math.exp(-rate * (high - low))
            low, index = high, index + 1


def _growth(span: float, rate: float, survival: float) -> float:
    """Increase of U over `span` seconds at constant hazard, starting at conditional survival."""
    if math.isinf(span):
        return math.inf if rate > 1e-15 or survival < 1.0 else 0.0
    if rate <= 1e-15:
        return span * (1.0 - survival)
    return span - survival * (1.0 - math.exp(-rate * span)) / rate


def _solve(target: float, rate: float, survival: float, span: float) -> float:
    """The smallest d <= span with _growth(d) >= target (bisection; U is increasing in d)."""
    low, high = 0.0, span
    if math.isinf(high):
        high = max(target, 1.0)
        while _growth(high, rate, survival) < target:
            if high > _NEVER_S:
                return high  # practically never: the floor will see to it
            high *= 2.0
    for _ in range(40):
        middle = (low + high) / 2.0
        if _growth(middle, rate, survival) >= target:
            high = middle
        else:
            low = middle
        if high - low < 0.05:
            break
    return high

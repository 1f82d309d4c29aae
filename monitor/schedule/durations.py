"""Learned run times per `kind`: ends by age, with running executions as censored observations.

The hazard is piecewise constant over geometric age bins (the maximum-likelihood estimate under
censoring, the continuous-time relative of Kaplan-Meier): h_b = ends in bin b / seconds of running
observed at ages in bin b. Every tracked execution adds its seconds of running as it is polled
(censored: it has not ended yet) and one end when it ends, so long runs still going count as
"not yet" instead of being missing, and a kind that always takes 10-20 minutes learns that
nothing ends before 10 minutes. Each bin's estimate pools its two neighbours (ages within 15 %
either way): early on, a bin's few ends are mostly chance, and a bin with none sent its runs to
the floor (no-progress, seeds 1000-1004: mean 0.98 against 0.99, kinds-no-progress 0.66 against
0.67, mixed-stream 0.28 against 0.29; the others unchanged). Sparse bins shrink toward the kind's
overall rate.

`Durations.export()` / `Durations.load()` give a JSON-able dict (ages only, no clock), so that a
restarted daemon or tomorrow's batch starts informed.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

_FIRST_EDGE_S = 30.0
_GROWTH = 1.15
_BINS = 72  # 30 s * 1.15**71: about 6 days; older ages share the last bin
EDGES = [0.0] + [_FIRST_EDGE_S * _GROWTH**i for i in range(_BINS - 1)]
_PRIOR_RATE = 1e-4  # ends per second of running, before any were seen (one pseudo-event)
_SHRINK_BINS = 2.0  # pseudo-exposure of a bin: this many of its own widths at the kind's rate
EXPORT_VERSION = 1


class AgeTable:
    """Ends and exposure per age bin, for one kind."""

    __slots__ = ("ends", "events", "exposure", "seconds")

    def __init__(self) -> None:
        self.ends = [0.0] * _BINS
        self.exposure = [0.0] * _BINS
        self.events = 0.0
        self.seconds = 0.0

    def expose(self, start_age: float, end_age: float) -> None:
        if end_age <= start_age:
            return
        self.seconds += end_age - start_age
        b = _bin(start_age)
        age = start_age
        while age < end_age:
            upper = EDGES[b + 1] if b + 1 < _BINS else math.inf
            step = min(upper, end_age) - age
            self.exposure[b] += step
            age += step
            b += 1

    def end(self, age: float) -> None:
        self.ends[_bin(max(age, 0.0))] += 1.0
        self.events += 1.0

    def rate(self) -> float:
        return (self.events + 1.0) / (self.seconds + 1.0 / _PRIOR_RATE)

    def hazard(self, b: int, overall: float) -> float:
        """Ends per second of running at the ages of bin b and its neighbours, shrunk toward `overall`."""
        width = (EDGES[b + 1] if b + 1 < _BINS else EDGES[b]) - EDGES[b]
        pseudo = _SHRINK_BINS * max(width, _FIRST_EDGE_S)
        lo, hi = max(b - 1, 0), min(b + 2, _BINS)
        return (sum(self.ends[lo:hi]) + overall * pseudo) / (sum(self.exposure[lo:hi]) + pseudo)

    def next_poll(self, age: float, unit: float, limit: float, extra: float = 0.0) -> float:
        """Seconds from `age` until the integral of sqrt(hazard + extra) reaches `unit` (at most `limit`)."""
        overall = self.rate()
        b = _bin(age)
        spent = 0.0
        elapsed = 0.0
        while elapsed < limit:
            upper = EDGES[b + 1] if b + 1 < _BINS else math.inf
            span = min(upper - (age + elapsed), limit - elapsed)
            w = math.sqrt(self.hazard(b, overall) + extra)
            if w > 0 and spent + w * span >= unit:
                return elapsed + (unit - spent) / w
            spent += w * span
            elapsed += span
            b = min(b + 1, _BINS - 1)
        return limit

    def weight(self, age: float, extra: float = 0.0) -> float:
        return math.sqrt(self.hazard(_bin(age), self.rate()) + extra)

    def export(self) -> dict[str, Any]:
        return {"ends": list(self.ends), "exposure": [round(x, 3) for x in self.exposure]}

    @classmethod
    def load(cls, data: object) -> AgeTable | None:
        if not isinstance(data, dict):
            return None
        ends, exposure = data.get("ends"), data.get("exposure")
        if not (isinstance(ends, list) and isinstance(exposure, list) and len(ends) == len(exposure) == _BINS):
            return None
        if not all(_ok(x) for x in ends + exposure):
            return None
        table = cls()
        table.ends = [float(x) for x in ends]
        table.exposure = [float(x) for x in exposure]
        table.events = sum(table.ends)
        table.seconds = sum(table.exposure)
        return table


class Durations:
    """Age tables by kind label (None: executions without one)."""

    __slots__ = ("tables",)

    def __init__(self) -> None:
        self.tables: dict[str | None, AgeTable] = {}

    def table(self, kind: str | None) -> AgeTable:
        table = self.tables.get(kind)
        if table is None:
            table = self.tables[kind] = AgeTable()
        return table

    def export(self) -> dict[str, Any]:
        return {
            "v": EXPORT_VERSION,
            "edges_s": [round(e, 3) for e in EDGES],
            "kinds": [{"kind": k, **t.export()} for k, t in self.tables.items()],
        }

    def load(self, data: object) -> None:
        """Merge an export (from this or another process); malformed parts are ignored."""
        if not isinstance(data, dict) or data.get("v") != EXPORT_VERSION:
            return
        kinds = data.get("kinds")
        if not isinstance(kinds, list):
            return
        for item in kinds:
            if not isinstance(item, dict):
                continue
            kind = item.get("kind")
            if kind is not None and not isinstance(kind, str):
                continue
            loaded = AgeTable.load(item)
            if loaded is None:
                continue
            table = self.table(kind)
            for b in range(_BINS):
                table.ends[b] += loaded.ends[b]
                table.exposure[b] += loaded.exposure[b]
            table.events += loaded.events
            table.seconds += loaded.seconds


def _bin(age: float) -> int:
    return max(min(bisect.bisect_right(EDGES, age) - 1, _BINS - 1), 0)


def _ok(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

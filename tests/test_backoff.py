"""Full-jitter backoff: the ceiling doubles from `base` per attempt up to `cap`; draws stay under it."""

from __future__ import annotations

import math
import random

import pytest

from monitor.backoff import full_jitter


class CeilingRandom(random.Random):
    """uniform(a, b) returns b: the ceiling the formula asks for."""

    def uniform(self, a: float, b: float) -> float:
        assert a == 0.0  # full jitter: always from zero
        return b


def test_the_ceiling_starts_at_base_and_doubles_up_to_the_cap() -> None:
    rng = CeilingRandom()
    ceilings = [full_jitter(attempt, 1.0, 30.0, rng) for attempt in range(1, 8)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_huge_attempt_numbers_stay_finite_at_the_cap() -> None:
    rng = CeilingRandom()
    assert full_jitter(10_000, 1.0, 300.0, rng) == 300.0
    assert math.isfinite(full_jitter(10_000, 1.0, math.inf, rng))  # 2.0**9999 would overflow


def test_attempt_zero_or_less_waits_at_most_base() -> None:
    assert full_jitter(0, 2.0, 60.0, CeilingRandom()) == 2.0


def test_draws_are_spread_over_the_whole_window() -> None:
    rng = random.Random(5)
    draws = [full_jitter(3, 1.0, 60.0, rng) for _ in range(2000)]
    assert all(0.0 <= d <= 4.0 for d in draws)
    assert min(draws) < 0.1
    assert max(draws) > 3.9
    assert sum(draws) / len(draws) == pytest.approx(2.0, abs=0.15)

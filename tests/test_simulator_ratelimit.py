"""The sliding window, at chosen times: exact where a fixed-window counter would be wrong."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from monitor.rates import RateLimit
from monitor.simulator.ratelimit import SlidingWindows


def test_sliding_not_fixed_windows() -> None:
    windows = SlidingWindows(RateLimit(3, 10.0))
    # Three late in [0, 10), two early in [10, 20): a fixed-window counter allows all five.
    assert [windows.admit("k", t).allowed for t in (8.0, 9.0, 9.5)] == [True, True, True]
    refused = windows.admit("k", 10.5)
    assert not refused.allowed
    # The refused request counts too; the next one passes once 8.0 and 9.0 have left: at 19.0.
    assert refused.retry_after_s == 9
    assert not windows.admit("k", 18.9).allowed  # (8.9, 18.9] still holds 9.0, 9.5, 10.5
    assert windows.max_requests_in_window == 4


def test_half_open_window_and_retry_after_is_honest() -> None:
    windows = SlidingWindows(RateLimit(2, 1.0))
    assert windows.admit("k", 0.0).allowed
    assert windows.admit("k", 0.5).allowed
    refused = windows.admit("k", 0.6)
    assert not refused.allowed
    assert refused.retry_after_s == 1
    assert windows.admit("k", 0.6 + refused.retry_after_s).allowed  # 1.6: (0.6, 1.6] held one
    # A request exactly T after another no longer counts it: (t - T, t].
    fresh = SlidingWindows(RateLimit(1, 2.0))
    assert fresh.admit("k", 1.0).allowed
    assert fresh.admit("k", 3.0).allowed


def test_keys_are_separate() -> None:
    windows = SlidingWindows(RateLimit(1, 60.0))
    assert windows.admit("a", 0.0).allowed
    assert windows.admit("b", 0.0).allowed
    assert not windows.admit("a", 1.0).allowed
    assert windows.max_requests_in_window == 2


def test_no_limit_counts_over_sixty_seconds() -> None:
    windows = SlidingWindows(None)
    for t in range(100):
        assert windows.admit("k", t * 0.5).allowed
    assert windows.max_requests_in_window == 100  # 0.0 .. 49.5 all within 60 s
    for t in range(100):
        windows.admit("k", 1000 + t * 2.0)
    assert windows.max_requests_in_window == 100


@given(
    st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=80),
    st.integers(min_value=1, max_value=10),
    st.sampled_from([0.5, 1.0, 3.0, 10.0]),
)
def test_max_in_window_and_admissions_match_brute_force(times: list[float], limit: int, window: float) -> None:
    times.sort()
    windows = SlidingWindows(RateLimit(limit, window))
    admitted = [windows.admit("k", t).allowed for t in times]
    counts = [sum(1 for s in times[: i + 1] if t - window < s) for i, t in enumerate(times)]
    assert windows.max_requests_in_window == max(counts)
    assert admitted == [c <= limit for c in counts]

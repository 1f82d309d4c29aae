"""The simulator's per-key sliding-window rate limit, and the exact server-side window count.

A request at time t counts against the requests of its key in (t - T, t], throttled ones
included (a 429 still costs the client). One deque of request times per key: appending and
dropping from the left are O(1), so each request costs O(1) amortised.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from monitor.rates import RateLimit

UNLIMITED_WINDOW_S = 60.0  # the window `max_requests_in_window` is counted over with no limit


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    retry_after_s: int = 0  # whole seconds, >= 1, when refused


class SlidingWindows:
    """One window per key. `admit(key, now)` records the request and says whether it may proceed."""

    def __init__(self, rate_limit: RateLimit | None) -> None:
        self.rate_limit = rate_limit
        self.window_s = rate_limit.window_s if rate_limit else UNLIMITED_WINDOW_S
        self._windows: dict[str, deque[float]] = {}
        self.max_requests_in_window = 0

    def admit(self, key: str, now: float) -> Admission:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = deque()
        horizon = now - self.window_s
        while window and window[0] <= horizon:
            window.popleft()
        window.append(now)
        # Any window holding the most requests can slide until its right edge is a request,
        # so the deque length right after an append, maximised over time, is the exact count.
        self.max_requests_in_window = max(self.max_requests_in_window, len(window))
        limit = self.rate_limit.limit if self.rate_limit else None
        if limit is None or len(window) <= limit:
            return Admission(True)
        return Admission(False, self._retry_after(window, limit, now))

    def _retry_after(self, window: deque[float], limit: int, now: float) -> int:
        """Seconds until a request would pass: the next one passes once at most limit-1 remain.

        With m requests in the window (this refused one included), that is when the one at
        index m - limit leaves, i.e. at window[m - limit] + T.
        """
        leaves_at = window[len(window) - limit] + self.window_s
        return max(1, math.ceil(leaves_at - now))

"""Exponential backoff with full jitter, for retries after failures (not for the polling cadence).

Full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter") spreads the retries of many
failing callers over the whole window instead of bunching them at its end.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 60  # base * 2**60 is far beyond any cap, and the float stays finite


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...):
    uniform(0, min(cap, base * 2**(attempt - 1))), so the first retry waits at most `base_s`."""
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    return rng.uniform(0.0, min(cap_s, base_s * 2.0**exponent))

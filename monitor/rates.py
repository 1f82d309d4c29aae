"""Rate strings such as "30/60s": parsed once, shared by the config, the simulator and the budget."""

from __future__ import annotations

import re
from dataclasses import dataclass

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `limit` requests in any sliding window of `window_s` seconds."""

    limit: int
    window_s: float

    def __str__(self) -> str:
        return f"{self.limit}/{self.window_s:g}s"

    @property
    def per_second(self) -> float:
        return self.limit / self.window_s


DEFAULT_RATE_LIMIT = RateLimit(30, 60.0)  # the vendor's documented limit per key


def parse_rate_limit(text: str) -> RateLimit:
    """Parse "N/T[unit]" (unit s by default, also ms, m, h), e.g. "30/60s" or "30/1m".

    Raises ValueError with a message that says what is expected.
    """
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"rate limit {text!r} is not of the form N/T, e.g. '30/60s' (N requests per T seconds)")
    limit = int(match.group(1))
    window_s = float(match.group(2)) * _UNIT_S[match.group(3) or "s"]
    if limit < 1 or window_s <= 0:
        raise ValueError(f"rate limit {text!r} needs N >= 1 and T > 0, e.g. '30/60s'")
    return RateLimit(limit, window_s)


UNLIMITED = "none"  # how an unlimited budget is written: `--rate-limit none`, `rate_limit = "none"`


def parse_rate_limit_or_none(text: str) -> RateLimit | None:
    """`parse_rate_limit`, or None (no limit at all) for "none" in any case.

    Raises ValueError, as parse_rate_limit does, for anything else.
    """
    if text.strip().lower() == UNLIMITED:
        return None
    return parse_rate_limit(text)


def format_rate_limit(rate: RateLimit | None) -> str:
    """ "30/60s", or "none" for no limit: what a log line or a live view shows."""
    return UNLIMITED if rate is None else str(rate)


def parse_duration(text: str) -> float:
    """Parse a duration such as "90", "90s", "15m", "2h", "1.5h" or "7d" into seconds."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", text)
    if not match:
        raise ValueError(f"duration {text!r} is not a number with an optional unit (ms, s, m, h, d), e.g. '15m'")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]

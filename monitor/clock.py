"""Time, read from the event loop only, so that the same code runs on real or virtual time.

The scheduler, the budget and the simulator call `Clock.now()` (the loop's monotonic clock).
Wall-clock timestamps (for records and for state that outlives the process) are derived from
one anchor taken at start, so a virtual-time loop yields consistent virtual wall times too.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime


class Clock:
    """Loop time plus a fixed mapping from loop time to wall time (epoch seconds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, wall_anchor: float | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop_anchor = self._loop.time()
        self._wall_anchor = time.time() if wall_anchor is None else wall_anchor

    def now(self) -> float:
        """Monotonic seconds on the event loop's clock."""
        return self._loop.time()

    def wall(self, loop_t: float | None = None) -> float:
        """Epoch seconds for a loop time (default: now)."""
        t = self.now() if loop_t is None else loop_t
        return self._wall_anchor + (t - self._loop_anchor)

    def to_loop(self, wall_t: float) -> float:
        """Loop time for an epoch timestamp (used when state written by another process is loaded)."""
        return self._loop_anchor + (wall_t - self._wall_anchor)

    def iso(self, loop_t: float | None = None) -> str:
        """ISO 8601 UTC with a `Z`, as the vendor API writes timestamps."""
        return iso_utc(self.wall(loop_t))


def iso_utc(epoch_s: float) -> str:
    """Epoch seconds as `2025-11-11T10:30:30Z` (milliseconds kept when not whole)."""
    dt = datetime.fromtimestamp(epoch_s, tz=UTC)
    text = dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return text.replace(".000Z", "Z")


def parse_iso(text: str) -> float | None:
    """Epoch seconds from an ISO 8601 timestamp, or None when it is not one."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()

"""One sink's circuit breaker and pause: when the whole sink may be tried, and with which row.

A sink that fails `threshold` attempts in a row is open: nothing is sent to it but one probe at a
time, each after a capped, fully jittered backoff that grows with every failed probe. A probe (or
any attempt) that succeeds closes it and the backlog flows again. Independently, a `Retry-After`
from the sink pauses it as a whole until then. Times are loop seconds, given by the caller, so the
same logic runs on real and virtual time.
"""

from __future__ import annotations

import random

from monitor.backoff import full_jitter


class Circuit:
    """Closed (send freely), paused (send nothing until `paused_until`) or open (probe by probe)."""

    def __init__(self, threshold: int, base_s: float, cap_s: float, rng: random.Random) -> None:
        self.threshold = threshold  # consecutive failures that open it; 0: never opens
        self._base_s = base_s
        self._cap_s = cap_s
        self._rng = rng
        self.failures = 0  # failed attempts in a row
        self.is_open = False
        self.opened_at: float | None = None
        self.paused_until = 0.0
        self.probe: str | None = None  # the event_id of the probe in flight
        self._failed_probes = 0

    def may_send(self, now: float) -> bool:
        """Closed and not paused: any due row may go."""
        return not self.is_open and now >= self.paused_until

    def may_probe(self, now: float) -> bool:
        """Open, its backoff over, and no probe in flight: one row may go."""
        return self.is_open and self.probe is None and now >= self.paused_until

    def admits(self, event_id: str, now: float) -> bool:
        """May this row be attempted now (a worker's last check before sending)?"""
        return self.may_send(now) or (self.is_open and event_id == self.probe)

    def resume_at(self) -> float | None:
        """Loop time from which something may be sent; None while a probe's verdict is awaited."""
        if self.is_open and self.probe is not None:
            return None
        return self.paused_until

    def pause(self, now: float, seconds: float) -> None:
        """The sink asked for a break (Retry-After): send nothing before now + seconds."""
        self.paused_until = max(self.paused_until, now + seconds)

    def succeeded(self) -> bool:
        """An attempt got through (or the sink answered at all); True if that closed the circuit."""
        self.failures = 0
        if not self.is_open:
            return False
        self.is_open = False
        self.opened_at = None
        self.probe = None
        self.paused_until = 0.0
        self._failed_probes = 0
        return True

    def failed(self, event_id: str, now: float) -> bool:
        """An attempt failed; True if that opened the circuit."""
        self.failures += 1
        if self.is_open:
            if event_id == self.probe:
                self.probe = None
                self._failed_probes += 1
                self._back_off(now)
            return False
        if self.threshold and self.failures >= self.threshold:
            self.is_open = True
            self.opened_at = now
            self._failed_probes = 1
            self._back_off(now)
            return True
        return False

    def release(self, event_id: str) -> None:
        """An attempt ended without a verdict on the sink (the store failed, a shutdown)."""
        if self.probe == event_id:
            self.probe = None

    def _back_off(self, now: float) -> None:
        self.pause(now, full_jitter(self._failed_probes, self._base_s, self._cap_s, self._rng))

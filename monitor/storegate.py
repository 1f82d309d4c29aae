"""The state store's health: faults pause polling, a probe with backoff finds the recovery.

Disk full, an I/O error or a busy database are faults, not corruption: whatever raised the fault
did not happen, and the Monitor stops spending the API budget on answers it could not record.
The gate logs the fault once, probes the store with backoff and reopens when a probe succeeds.
A fault that lasts longer than `grace_s` is a failure: `run` raises MonitorFailed, so that a
supervisor restarts the process (the state on disk is intact; the restart resumes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from monitor.errors import MonitorFailed, StoreFault
from monitor.logs import get_logger

log = get_logger(__name__)

_PROBE_FIRST_S = 0.5
_PROBE_CAP_S = 5.0


class Probeable(Protocol):
    def probe(self) -> None:
        """A tiny write; raises StoreFault while the store still cannot write."""


class StoreGate:
    """Open while the store records; closed (with a reason) from a fault until a probe succeeds."""

    def __init__(self, store: Probeable, *, grace_s: float, on_change: Callable[[str | None], None]) -> None:
        self._store = store
        self._grace_s = grace_s
        self._on_change = on_change
        self._faulted = asyncio.Event()
        self.reason: str | None = None
        self.since: float | None = None  # loop time of the first fault
        self.faults = 0

    @property
    def open(self) -> bool:
        return self.reason is None

    def report(self, exc: StoreFault) -> None:
        """A store call failed with a fault: close the gate (once) and let `run` probe."""
        self.faults += 1
        if self.reason is not None:
            return
        self.reason = f"the state store is failing: {exc}"
        self.since = asyncio.get_running_loop().time()
        log.error("state store fault: polling paused until it records again", error=str(exc), grace_s=self._grace_s)
        self._faulted.set()
        self._on_change(self.reason)

    async def run(self) -> None:
        """Forever: wait for a fault, probe with backoff until recovery or past the grace period."""
        while True:
            await self._faulted.wait()
            await self._probe_until_recovered()
            self._faulted.clear()

    async def _probe_until_recovered(self) -> None:
        loop = asyncio.get_running_loop()
        delay = _PROBE_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                self._store.probe()
            except StoreFault as exc:
                since = self.since if self.since is not None else loop.time()
                if loop.time() - since >= self._grace_s:
                    raise MonitorFailed(
                        f"the state store kept failing for {self._grace_s:g} s (state.fault_grace_s): {exc}"
                    ) from exc
                delay = min(delay * 2, _PROBE_CAP_S, max(self._grace_s - (loop.time() - since), 0.05))
                continue
            took = loop.time() - (self.since or loop.time())
            log.info("state store records again: polling resumes", fault_lasted_s=round(took, 1))
            self.reason = None
            self.since = None
            self._on_change(None)
            return

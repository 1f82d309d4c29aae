"""Replicas on PostgreSQL: this process's share of the tracked executions.

A replica holds a lease on each execution it polls. Every `lease_s / 10` it renews them and claims
its fair share of the rest (new ones, and those of a replica that stopped renewing) in one short
transaction (`PgStore.claim_cycle`). A lease lasts 0.4 `lease_s`: a replica that dies (even
kill -9) has its executions claimed by the others within half of `lease_s`, which leaves the
other half to poll them (they go first), while a live one has three renewals to spare.
What it gained is polled first (nobody has for a while); what it lost is dropped from its own
scheduler only: the database keeps it for the new owner. A stale
replica cannot deliver anything twice, since a result commits only while its fence matches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from monitor.errors import StoreFault
from monitor.logs import get_logger
from monitor.state.rows import TrackedRow

log = get_logger(__name__)

LEASE_SHARE = 0.4  # of state.lease_s: how long one renewal lasts
CYCLES_PER_LEASE = 10  # renewals and claims per state.lease_s


class LeaseChangeLike(Protocol):
    @property
    def gained(self) -> Sequence[TrackedRow]: ...

    @property
    def lost(self) -> Sequence[str]: ...


class LeasingStore(Protocol):
    def claim_cycle(self) -> Any: ...


@dataclass
class LeaseKeeper:
    """Runs the claim cycles; the Monitor gives it what to do with gains and losses."""

    store: LeasingStore
    lease_s: float
    on_gained: Callable[[Sequence[TrackedRow]], None]
    on_lost: Callable[[Sequence[str]], None]
    after_cycle: Callable[[], None]  # e.g. rescan the outbox for rows whose claim lapsed elsewhere
    on_fault: Callable[[StoreFault], None]
    cycles: int = field(default=0, init=False)

    @property
    def every_s(self) -> float:
        return self.lease_s / CYCLES_PER_LEASE

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.cycle()

    def cycle(self) -> None:
        try:
            change: LeaseChangeLike = self.store.claim_cycle()
        except StoreFault as exc:  # the gate pauses polling; leases may lapse meanwhile (fenced)
            self.on_fault(exc)
            return
        self.cycles += 1
        if change.lost:
            log.info("executions now held by another replica", count=len(change.lost))
            self.on_lost(change.lost)
        if change.gained:
            log.info("executions taken over", count=len(change.gained))
            self.on_gained(change.gained)
        self.after_cycle()

"""Stall detection: a running execution whose progress and updated_at stand still for too long.

Every running answer moves or extends the execution's current *stretch* (the time since its last
change of `progress` or `updated_at`: the server's `updated_at` when it gives one, else the time
of the poll that saw the change). A stretch that reaches the threshold is a freeze: one `stalled`
event, and one `resumed` event when the execution moves again. A freeze is named after its
`updated_at`, so its event_ids are the same after a restart and no freeze is reported twice.

The threshold (`polling.stall_after`) is a fixed duration, or "auto": FACTOR x the QUANTILE of
the stretches that running executions of the same `kind` label have ended (one pool for those
without one; one sample per stretch, its length as far as polls saw it), and at least FLOOR_S. A
high quantile, not a median, because one kind may mix runs that move every few seconds with runs
that report at checkpoints an hour apart; and never below OWN_FACTOR x the longest stretch the
execution itself has ended (a run that reports at checkpoints shows it early). COLD_S until the
pool has MIN_SAMPLES and has watched for COLD_S, and until the execution has ended a stretch of
its own. A run still queued (progress 0 and never moved, or current_step "Queued") is stalled only
after FACTOR x its kind's usual wait in the queue, learned the same way (until then the larger of
COLD_QUEUE_S and QUEUE_FACTOR x the running threshold). An answer with neither progress nor
updated_at says nothing about movement: it is not watched.
"""

from __future__ import annotations

import math
from array import array

from monitor.api.models import StatusRecord
from monitor.clock import Clock, iso_utc, parse_iso
from monitor.records import StallEvent, StallKind
from monitor.schedule.state import ExecState

FLOOR_S = 600.0  # "auto" never alarms before 10 min without a change
COLD_S = 1800.0  # "auto" for a kind not learned yet: generous, as nothing is known
COLD_QUEUE_S = 3600.0  # the same for a wait in a queue, whose tail is longer still
FACTOR = 3.0  # x the kind's usual longest stretch (benchmarks/stalls.py: 4 x finds half as many stalls)
QUANTILE = 0.99
OWN_FACTOR = 4.0  # x the run's own longest stretch: checkpoints are irregular
QUEUE_FACTOR = 3.0
MIN_SAMPLES = 50
CHECK_FROM = 0.5  # a run unchanged for this share of its threshold is looked at again when it crosses
QUEUED_STEP = "Queued"
KIND_LABEL = "kind"

_BASE = 1.1  # histogram buckets grow by 10 %: [1.1**(i-1), 1.1**i) seconds
_BUCKETS = 160  # up to ~46 days
_WINDOW = 5000.0  # samples: older ones count half once twice as many came (a running quantile)


class _Pool:
    """A running quantile of durations: a log-bucket histogram whose counts halve now and then."""

    __slots__ = ("counts", "since", "total")

    def __init__(self, since: float) -> None:
        self.counts = array("d", bytes(8 * _BUCKETS))
        self.total = 0.0
        self.since = since  # loop time of its first sample

    def add(self, seconds: float) -> None:
        index = 0 if seconds < 1.0 else min(int(math.log(seconds, _BASE)) + 1, _BUCKETS - 1)
        self.counts[index] += 1.0
        self.total += 1.0
        if self.total >= 2 * _WINDOW:
            for i in range(_BUCKETS):
                self.counts[i] /= 2
            self.total /= 2

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding the q-quantile (errs long: fewer false alarms)."""
        target, seen = q * self.total, 0.0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= target:
                return float(_BASE**index)
        return float(_BASE ** (_BUCKETS - 1))


class StallDetector:
    """Notes every running answer in the execution's state; says when it stalls or resumes."""

    def __init__(self, clock: Clock, stall_after_s: float | None = None) -> None:
        if stall_after_s is not None and not stall_after_s > 0:
            raise ValueError("stall_after must be a positive duration, or None for auto")
        self._clock = clock
        self._fixed = stall_after_s
        self._pools: dict[tuple[str | None, bool], _Pool] = {}

    def threshold(self, kind: str | None, *, queued: bool = False, now: float | None = None) -> float:
        """Seconds without a change after which a run of this kind is stalled (queued: still waiting)."""
        now = self._clock.now() if now is None else now
        running = self._fixed if self._fixed is not None else self._learned(kind, False, now)
        if running is None:
            running = COLD_S
        if not queued:
            return running
        waiting = self._learned(kind, True, now)
        return max(running, waiting) if waiting is not None else max(COLD_QUEUE_S, QUEUE_FACTOR * running)

    def _learned(self, kind: str | None, queued: bool, now: float) -> float | None:
        """The learned threshold, once the pool has MIN_SAMPLES and has watched for COLD_S: the
        stretches that end first are the short ones, so an early quantile would be too low."""
        pool = self._pools.get((kind, queued))
        if pool is None or pool.total < MIN_SAMPLES or now - pool.since < COLD_S:
            return None
        return max(FLOOR_S, FACTOR * pool.quantile(QUANTILE))

    def limit(self, state: ExecState, now: float | None = None) -> float:
        """This execution's threshold for its current stretch."""
        limit = self.threshold(_kind(state), queued=state.queued, now=now)
        if self._fixed is None and not state.queued:
            # Its own pace: COLD_S until one of its stretches has ended (its kind may mix paces).
            limit = max(limit, OWN_FACTOR * state.longest if state.longest >= 0 else COLD_S)
        return limit

    def crossing(self, state: ExecState, now: float) -> float:
        """When to look again because its stretch will reach the threshold: only for a run that
        looked frozen at this answer already (half way there); inf otherwise and once stalled."""
        if state.stall_key is not None:
            return math.inf
        limit = self.limit(state, now)
        return state.changed_at + limit if now - state.changed_at >= CHECK_FROM * limit else math.inf

    def observe(self, state: ExecState, status: StatusRecord, now: float) -> StallEvent | None:
        """Note a running answer (before `state.last_poll` moves to `now`); the event it calls for.

        The event is not applied: call `applied` once it is recorded. Until then every answer
        calls for it again, with the same event_id.
        """
        if status.progress is None and status.updated_at is None:
            return None
        self._note(state, status, now)
        if state.stall_key is not None and state.stall_key != state.freeze:
            return self._event(StallKind.RESUMED, state, status, now)
        if state.stall_key is not None:
            return None  # stalled, reported already
        limit = self.limit(state, now)
        if now - state.changed_at < limit:
            return None
        return self._event(StallKind.STALLED, state, status, now, limit)

    def applied(self, state: ExecState, event: StallEvent) -> None:
        if event.kind is StallKind.STALLED:
            state.stall_key, state.stall_since = event.freeze, state.changed_at
        else:
            state.stall_key = None

    def _note(self, state: ExecState, status: StatusRecord, now: float) -> None:
        """Start a new stretch when the answer changed (or on the first answer). With `updated_at`
        the server says when it last changed, noise on the progress reading aside; without it, a
        new progress value is a change, seen at this poll."""
        mark = status.updated_at if status.updated_at is not None else f"progress:{status.progress}"
        if state.seen == mark:
            return
        first = state.seen is None
        stamp = None if status.updated_at is None else parse_iso(status.updated_at)
        at = now if stamp is None else min(self._clock.to_loop(stamp), now)
        if not first:
            at = max(at, state.changed_at)
            self._ended(state)
        state.queued = (status.progress or 0) == 0 and (first or (state.queued and status.current_step == QUEUED_STEP))
        state.seen = mark
        state.changed_at = at
        state.freeze = status.updated_at if status.updated_at is not None else f"poll:{iso_utc(self._clock.wall(at))}"

    def _ended(self, state: ExecState) -> None:
        """A stretch ended: it lasted at least until the last poll that saw it. One sample per
        stretch, not per poll (a frozen run polled often would otherwise teach that freezes are
        usual); a freeze reported stalled is no sample of the usual at all."""
        if state.stall_key == state.freeze:
            return
        lasted = state.last_poll - state.changed_at
        if lasted >= 0:
            self._pool(_kind(state), state.queued, state.last_poll).add(lasted)
            if not state.queued:
                state.longest = max(state.longest, lasted)

    def _pool(self, kind: str | None, queued: bool, now: float) -> _Pool:
        pool = self._pools.get((kind, queued))
        if pool is None:
            pool = self._pools[kind, queued] = _Pool(now)
        return pool

    def _event(
        self, kind: StallKind, state: ExecState, status: StatusRecord, now: float, limit: float = 0.0
    ) -> StallEvent:
        wall = self._clock.wall
        resumed = kind is StallKind.RESUMED
        return StallEvent(
            kind=kind,
            execution_id=state.execution_id,
            freeze=(state.stall_key or "") if resumed else state.freeze,
            last_change_at=wall(state.stall_since if resumed else state.changed_at),
            observed_at=wall(now),
            stall_after_s=limit,
            progress=status.progress,
            current_step=status.current_step,
            resumed_at=wall(state.changed_at) if resumed else None,
            group=state.group,
            labels=dict(state.labels or {}),
        )


def _kind(state: ExecState) -> str | None:
    labels = state.labels
    return None if not labels else labels.get(KIND_LABEL)

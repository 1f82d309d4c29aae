"""`Monitor`: the one engine behind the Python API, `execmon watch`, `execmon run` and the control API.

    registry (store) -> scheduler -> budget -> client -> outcome -> outbox (store) -> delivery -> sinks

The Monitor owns the pieces' lifetimes and is the scheduler's listener: every poll is recorded,
and a terminal outcome is written to the outbox in the same transaction that marks the execution
terminal, before anyone (sinks, `results()`, subscribers) sees it. Every background task runs
under one supervisor (an `asyncio.TaskGroup`): a task that dies fails the Monitor loudly, and
`wait`/`results` raise `MonitorFailed`. State-store faults pause polling instead (see `storegate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from monitor.api.client import ExecutionsClient
from monitor.api.models import StatusRecord
from monitor.clock import Clock, parse_iso
from monitor.config import Config, SinkConfig, find_config_path, load_config
from monitor.delivery import Delivery
from monitor.errors import ExecmonError, KeyRejectedError, LeaseLost, MonitorFailed, StoreFault
from monitor.events import (
    Ended,
    Event,
    Failed,
    KeyRejected,
    KeyRestored,
    Polled,
    Resumed,
    Stalled,
    StoreFaulted,
    StoreRecovered,
    Subscriber,
)
from monitor.ids import validate_execution_id
from monitor.learning import LearningKeeper
from monitor.logs import get_logger
from monitor.metrics import Metrics
from monitor.records import (
    Outcome,
    StallEvent,
    StallKind,
    TerminalEvent,
    TrackResult,
    build_result_record,
    build_stall_record,
    new_batch_id,
)
from monitor.replicas import LEASE_SHARE, LeaseKeeper
from monitor.results import Result
from monitor.schedule.budget import Budget
from monitor.schedule.policy import make_policy
from monitor.schedule.scheduler import Scheduler
from monitor.secrets import Secret
from monitor.sinks.base import Sink
from monitor.sinks.registry import SinkHandle, build_sinks, handle_for, parse_sink_spec
from monitor.state.pg import redact_url
from monitor.state.pg.store import PgStore
from monitor.state.rows import TrackedRow, TrackRequest
from monitor.state.select import is_postgres_url, state_path
from monitor.state.store import Store
from monitor.storegate import StoreGate
from monitor.supervisor import Supervisor

log = get_logger(__name__)

AnyStore = Store | PgStore

_METRICS_EVERY_S = 5.0
_FLUSH_EVERY_S = 1.0  # poll bookkeeping is written in batches; a kill loses at most this much (one extra poll)
_PRUNE_EVERY_S = 60.0  # retention is counted in days: a pass a minute keeps the state file bounded
_PRUNE_BATCH = 500  # rows per transaction: a batch holds the loop for milliseconds, not seconds
_OUTCOMES = tuple(o.value for o in Outcome)
_KEYWORD_KEYS = {"base_url": "api.base_url", "rate_limit": "api.rate_limit", "policy": "polling.policy"}


class NotTrackedError(ExecmonError, LookupError):
    """`wait`/`results` for an execution that is not tracked (never, or no longer)."""


class Monitor:
    """Track execution IDs, poll them within the key's budget, hand out every result durably.

    ```
    async with Monitor(base_url=url, api_key=key) as mon:
        await mon.track(ids)
        async for result in mon.results(ids):
            ...
    ```
    Keywords left out come from the `EXECMON_*` environment variables, then the defaults.
    `state=None` keeps everything in memory; a path is an SQLite file with the durability of
    `execmon watch --state` (a restart resumes; nothing is delivered twice to the file sink);
    a `postgresql://` URL shares the state, the budget and the work with other replicas.
    `sinks`: specs such as `"jsonl:results.jsonl"` or `"webhook:URL"`, or Sink objects.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | Secret | None = None,
        rate_limit: str | None = None,
        policy: str | None = None,
        state: str | os.PathLike[str] | None = None,
        sinks: Sequence[str | Sink] = (),
        config: Config | None = None,
    ) -> None:
        if config is None:
            config = _config_from_keywords(base_url, api_key, rate_limit, policy, sinks)
        elif base_url is not None or api_key is not None or rate_limit is not None or policy is not None:
            raise TypeError("give either config= or the keywords base_url/api_key/rate_limit/policy, not both")
        self.config = config
        self.state_path = state_path(state)
        self.state_url = str(state) if is_postgres_url(state) else None
        self.metrics = Metrics()
        self._sinks = build_sinks(config.sinks) + _sink_objects(sinks)
        self._subscribers: list[Subscriber] = []
        self._waiters: set[asyncio.Queue[Result | None]] = set()
        self._supervisor = Supervisor(self._on_failure)
        self._failed = asyncio.Event()
        self._parts: _Parts | None = None
        self._closed = False

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Monitor:
        """A Monitor from a TOML config file (`config.example.toml` documents it); without a path,
        the file the commands read ($EXECMON_CONFIG, else ./execmon.toml if it exists).

        Overrides are the constructor's keywords (`base_url=`, `state=`, `sinks=`, ...); the state
        file is `[state] path` unless `state=` is given (`state=None`: in memory).
        """
        state = overrides.pop("state", ...)
        sinks = overrides.pop("sinks", ())
        flags = {_KEYWORD_KEYS[k]: v for k, v in overrides.items() if k in _KEYWORD_KEYS and v is not None}
        unknown = set(overrides) - set(_KEYWORD_KEYS) - {"api_key"}
        if unknown:
            raise TypeError(f"unknown override(s): {', '.join(sorted(unknown))}")
        if any(isinstance(s, str) for s in sinks):
            flags["sinks"] = [parse_sink_spec(s) for s in sinks if isinstance(s, str)]
        config = load_config(find_config_path(None if path is None else Path(path)), overrides=flags)
        if overrides.get("api_key") is not None:
            config = dataclasses.replace(config, env_api_key=_secret(overrides["api_key"]))
        objects = [s for s in sinks if not isinstance(s, str)]
        if state is ...:
            state = config.state.url or config.state.path
        return cls(config=config, state=state, sinks=objects)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._parts is not None or self._closed:
            raise RuntimeError("a Monitor runs once: make a new one")
        clock = Clock()
        store = self._open_store()
        try:
            gate = StoreGate(store, grace_s=self.config.state.fault_grace_s, on_change=self._on_store_change)
            await self._supervisor.start()
            delivery = Delivery(
                store,
                self._sinks,
                clock,
                metrics=self.metrics,
                spawn=self._supervisor.spawner(forever=True),
                on_store_fault=gate.report,
            )
            await delivery.start()
            self._parts = parts = _Parts(clock, store, gate, delivery)
            self._note_sinks(parts)
            parts.client = client = self._new_client(self.config)
            parts.budget = budget = self._new_budget(self.config, parts)
            parts.scheduler = self._new_scheduler(self.config, clock, client, budget)
            parts.learning = LearningKeeper(
                store, parts.scheduler.policy, on_fault=gate.report, state_name=self._state_name()
            )
            parts.learning.load()
            self._resume(parts.scheduler, store.load_active())
            spawn = self._supervisor.spawn
            if isinstance(store, PgStore):
                spawn(self._lease_keeper(parts, store).run(), "execmon-leases", forever=True)
            spawn(parts.scheduler.run(), "execmon-scheduler", forever=True)
            spawn(gate.run(), "execmon-store-gate", forever=True)
            spawn(self._flush_polls(), "execmon-poll-bookkeeping", forever=True)
            spawn(parts.learning.run(), "execmon-learning", forever=True)
            spawn(self._prune_state(), "execmon-retention", forever=True)
            spawn(self._refresh_metrics(), "execmon-metrics", forever=True)
        except BaseException:
            await self._close_parts(store)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown(self.config.control.grace_s)

    async def shutdown(self, grace_s: float) -> None:
        """Stop taking polls, let in-flight ones finish, flush the sinks: all within `grace_s`.

        Half the grace goes to in-flight polls, the rest to the sinks; whatever a sink has not
        confirmed by then stays pending in the outbox and is delivered by the next start.
        """
        parts = self._parts
        if parts is None or self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        try:
            if self.failure is None:
                self._supervisor.winding_down()  # the scheduler's task ends with its stop: expected
                await parts.require_scheduler().stop(grace_s / 2)
                if parts.learning is not None:
                    with contextlib.suppress(StoreFault):  # the last periodic save stands
                        parts.learning.save()
                self._release_leases(parts.store)
                await parts.delivery.drain(timeout=max(0.0, deadline - loop.time()))
        finally:
            await self._supervisor.stop()
            self._wake_waiters()
            await self._close_parts(parts.store)
            self._parts = None

    def _release_leases(self, store: AnyStore) -> None:
        """A replica that stops cleanly hands its executions over at once, not after lease_s."""
        if isinstance(store, PgStore):
            with contextlib.suppress(StoreFault):  # the leases then lapse by themselves
                store.release_all()

    async def _close_parts(self, store: AnyStore) -> None:
        parts = self._parts
        if parts is not None:
            await parts.delivery.close()
            if parts.client is not None:
                await parts.client.close()
        await self._supervisor.stop()
        store.close()  # flushes the poll bookkeeping first

    # -- building the parts --------------------------------------------------------------------

    def _open_store(self) -> AnyStore:
        if self.state_url is None:
            return Store.open(self.state_path)  # None: in memory
        lease = self.config.state.lease_s * LEASE_SHARE
        return PgStore.open(self.state_url, lease_s=lease)

    def _lease_keeper(self, parts: _Parts, store: PgStore) -> LeaseKeeper:
        scheduler = parts.require_scheduler()

        def gained(rows: Sequence[TrackedRow]) -> None:
            self._resume(scheduler, rows, taken_over=True)  # the keeper logs takeovers

        def lost(ids: Sequence[str]) -> None:
            for execution_id in ids:
                scheduler.untrack(execution_id)  # this process only: the new owner polls it

        return LeaseKeeper(
            store,
            self.config.state.lease_s,
            on_gained=gained,
            on_lost=lost,
            after_cycle=self._after_claim_cycle,
            on_fault=parts.gate.report,
        )

    def _new_client(self, config: Config) -> ExecutionsClient:
        return ExecutionsClient(
            config.api.base_url,
            config.api_key(),
            timeout_s=config.api.request_timeout_s,
            max_connections=config.api.max_connections,
            retry_after_cap_s=config.api.retry_after_cap_s,
        )

    def _after_claim_cycle(self) -> None:
        """Rows whose claim lapsed elsewhere are this replica's to deliver now; `results()` callers
        look for what the other replicas recorded."""
        self._require_parts().delivery.rescan()
        self._wake_waiters()

    def _new_budget(self, config: Config, parts: _Parts) -> Budget:
        """The key's budget, primed with what the previous process spent (persisted per request);
        on PostgreSQL, one budget for every replica: each request takes a slot in the ledger."""
        store, clock = parts.store, parts.clock
        if isinstance(store, PgStore):
            return Budget(config.api.rate_limit, clock, shared=store.shared_slots(config, on_fault=parts.gate.report))
        now = clock.wall()
        timeout = config.api.request_timeout_s
        rate = config.api.rate_limit
        recent = [] if rate is None else store.recent_requests(now - rate.window_s - timeout)  # None: no window
        history = [clock.to_loop(seen_at) for seen_at in _seen_at(recent, now, timeout)]
        return Budget(
            config.api.rate_limit,
            clock,
            history=history,
            on_request_started=lambda t: store.record_request(clock.wall(t)),
            on_request_done=self._request_done,
        )

    def _request_done(self, row: object, loop_t: float | None) -> None:
        parts = self._parts
        if parts is None or not isinstance(row, int) or loop_t is None:
            return
        try:
            parts.store.complete_request(row, parts.clock.wall(loop_t))
        except StoreFault as exc:  # the request stays counted as unanswered: safe, only a bit slower
            parts.gate.report(exc)

    def _new_scheduler(self, config: Config, clock: Clock, client: ExecutionsClient, budget: Budget) -> Scheduler:
        polling = config.polling
        policy = make_policy(
            polling.policy,
            initial_interval_s=polling.initial_interval_s,
            backoff_factor=polling.backoff_factor,
            max_interval_s=polling.max_interval_s,
        )
        return Scheduler(
            client,
            budget,
            policy,
            clock,
            max_in_flight=polling.max_in_flight,
            not_found_confirmations=polling.not_found_confirmations,
            not_found_min_span_s=polling.not_found_min_span_s,
            error_backoff_base_s=polling.error_backoff_base_s,
            error_backoff_cap_s=polling.error_backoff_cap_s,
            stall_after=polling.stall_after,
            listener=self,
            spawn=self._supervisor.spawner(),
        )

    def _resume(self, scheduler: Scheduler, rows: Iterable[TrackedRow], *, taken_over: bool = False) -> None:
        """Schedule executions from the store as they were; those `taken_over` from a replica that
        stopped are polled first, since nobody has polled them for a while."""
        count = 0
        for row in rows:
            # The deadline counts from the original tracked_since, which the restored state keeps.
            deadline_s = None if row.deadline_at is None else row.deadline_at - row.tracked_since
            scheduler.track(
                row.execution_id,
                deadline_s=deadline_s,
                group=row.group,
                labels=row.labels,
                restored=row.schedule or {"tracked_since": row.tracked_since, "polls": row.polls},
            )
            if taken_over:
                scheduler.poll_first(row.execution_id)
            count += 1
        if count and not taken_over:
            log.info("resumed tracked executions", count=count, state=self._state_name())

    def _state_name(self) -> str:
        return redact_url(self.state_url) if self.state_url is not None else str(self.state_path or ":memory:")

    # -- background work -----------------------------------------------------------------------

    async def _flush_polls(self) -> None:
        """Poll bookkeeping (schedules, last statuses) goes to the store in one transaction a second."""
        parts = self._require_parts()
        while True:
            await asyncio.sleep(_FLUSH_EVERY_S)
            try:
                parts.store.flush_polls()
            except StoreFault as exc:
                parts.gate.report(exc)

    async def _prune_state(self) -> None:
        """What ended more than `state.retention` ago and is delivered is forgotten, a batch at a
        time, the loop free to run polls and requests between batches."""
        parts = self._require_parts()
        while True:
            await asyncio.sleep(_PRUNE_EVERY_S)
            deleted = -1
            try:
                while deleted != 0:
                    deleted = parts.store.prune(parts.clock.wall(), self.config.state.retention, batch=_PRUNE_BATCH)
                    await asyncio.sleep(0)  # polls and control requests run between two batches
            except StoreFault as exc:
                parts.gate.report(exc)

    async def _refresh_metrics(self) -> None:
        """Gauges that are cheaper to sample than to keep exact on every change."""
        parts = self._require_parts()
        while True:
            stats = parts.require_budget().stats()
            self.metrics.set_budget(stats.used, math.inf if stats.free is None else stats.free)
            try:
                counts = {state: parts.store.count_executions(state) for state in ("pending", "running", *_OUTCOMES)}
                if isinstance(parts.store, PgStore):
                    self.metrics.set_replica_executions(parts.store.owned_counts())
            except StoreFault as exc:
                parts.gate.report(exc)
            else:
                self.metrics.set_tracked(counts)
            self.metrics.set_stalled(parts.require_scheduler().stalled_counts())
            await asyncio.sleep(_METRICS_EVERY_S)

    # -- the Python API ----------------------------------------------------------------------------

    async def track(
        self,
        ids: Iterable[str],
        *,
        group: str | None = None,
        labels: Mapping[str, str] | None = None,
        deadline: float | timedelta | None = None,
    ) -> TrackResult:
        """Start watching IDs. Every ID is validated first: an invalid one raises ValueError (an
        ExecmonError too) and nothing is tracked. IDs tracked or ended already are left as they are.
        `deadline`: seconds (or a timedelta) after which a still-running execution is `timed_out`."""
        wanted = list(dict.fromkeys(ids))
        for execution_id in wanted:
            validate_execution_id(execution_id)
        deadline_s = deadline.total_seconds() if isinstance(deadline, timedelta) else deadline
        return self.track_valid(wanted, deadline_s=deadline_s, group=group, labels=labels)

    def track_valid(
        self,
        ids: Sequence[str],
        *,
        deadline_s: float | None = None,
        group: str | None = None,
        labels: Mapping[str, str] | None = None,
        batch: str | None = None,
    ) -> TrackResult:
        """`track` for IDs already validated (persisted first, then scheduled). With a group, the
        call is one batch (one digest) unless `batch` continues an earlier one."""
        parts = self._require_running()
        if deadline_s is None and self.config.polling.deadline_s > 0:
            deadline_s = self.config.polling.deadline_s
        now = parts.clock.wall()
        deadline_at = None if deadline_s is None else now + deadline_s
        label_map = dict(labels or {})
        if group is not None and batch is None:
            batch = new_batch_id(now)
        requests = [
            TrackRequest(i, tracked_since=now, deadline_at=deadline_at, group=group, batch=batch, labels=label_map)
            for i in ids
        ]
        try:
            added = parts.store.track_many(requests)
        except StoreFault as exc:
            parts.gate.report(exc)
            raise
        scheduler = parts.require_scheduler()
        for execution_id in added:
            scheduler.track(execution_id, deadline_s=deadline_s, group=group, labels=label_map)
        fresh = set(added)
        return TrackResult(added, [i for i in ids if i not in fresh], batch if group is not None else None)

    def untrack(self, execution_id: str) -> bool:
        """Stop watching one ID (a pending delivery of its result stays). False if it was not tracked."""
        parts = self._require_running()
        parts.require_scheduler().untrack(execution_id)
        removed = parts.store.untrack(execution_id)
        if removed:
            self._wake_waiters()  # a `results()` waiting for it raises NotTrackedError
        return removed

    def retry_dead_letters(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Send dead letters again (all, one sink's or one event's); returns how many were queued.
        Raises StoreFault when the state store cannot be written (nothing changed then)."""
        count = self._require_running().delivery.retry_dead_letters(sink, event_id)
        if count:
            log.info("dead letters queued again", count=count, sink=sink, event_id=event_id)
        return count

    async def results(self, ids: Iterable[str]) -> AsyncGenerator[Result, None]:
        """Each execution's Result as it ends (those ended already first), then stop.

        Raises KeyRejectedError when the key is rejected, MonitorFailed when execmon cannot go
        on, and NotTrackedError for an ID that is not tracked: never hangs silently.
        """
        wanted = list(dict.fromkeys(ids))
        parts = self._require_parts()
        queue: asyncio.Queue[Result | None] = asyncio.Queue()
        self._waiters.add(queue)  # before reading the store: nothing can end unseen in between
        try:
            pending = set(wanted)
            for record in parts.store.terminal_records(wanted).values():
                pending.discard(str(record["execution_id"]))
                yield Result.from_record(record)
            check_tracked = True  # at first, then after each wake-up (an untrack may be the reason)
            while pending:
                self._raise_if_cannot_finish(pending if check_tracked else set())
                item = await queue.get()
                check_tracked = item is None
                if item is None and self.state_url is not None:
                    # Replicas: another one may have recorded some of them (woken every claim cycle).
                    for record in parts.store.terminal_records(sorted(pending)).values():
                        pending.discard(str(record["execution_id"]))
                        yield Result.from_record(record)
                if item is not None and item.execution_id in pending:
                    pending.discard(item.execution_id)
                    yield item
        finally:
            self._waiters.discard(queue)

    async def wait(self, ids: Iterable[str], *, timeout: float | None = None) -> dict[str, Result]:  # noqa: ASYNC109 -- the contract's signature
        """{execution_id: Result} once every one has ended; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout), contextlib.aclosing(self.results(ids)) as stream:
            return {result.execution_id: result async for result in stream}

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(event)` for every event (see `monitor.events`); returns the unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    @property
    def failure(self) -> MonitorFailed | None:
        """Why the Monitor stopped working, once it has (None while it works)."""
        return self._supervisor.failure

    @property
    def key_rejected(self) -> str | None:
        """The reason, while the API key is rejected (owned by the scheduler)."""
        parts = self._parts
        scheduler = None if parts is None else parts.scheduler
        return None if scheduler is None else scheduler.key_rejected

    def health(self) -> tuple[bool, str | None]:
        """(True, None) while polling can go on and results can be recorded; else the reasons."""
        reasons = [r for r in (self._failure_text(), self.key_rejected, self._store_fault_text()) if r]
        return (not reasons, "; ".join(reasons) or None)

    async def wait_failed(self) -> MonitorFailed:
        """Return the failure once the Monitor has failed (for a front end to exit on)."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    async def reload(self, config: Config) -> None:
        """Apply a new config (key, base URL, rate limit, sinks) without losing state; polling settings
        need a restart. The new client and sinks are built and opened first: if any of it fails
        (UsageError for a sink that cannot start), what was built is closed again and the old
        config, client, rate and sinks stay as they were. Only then is everything swapped."""
        parts = self._require_running()
        client, sinks = await self._build_for_reload(config, parts)
        # Nothing below can fail: the reload is all or nothing.
        old_client, parts.client = parts.client, client
        self.config = config
        budget = parts.require_budget()
        if config.api.rate_limit != budget.rate:
            budget.set_rate(config.api.rate_limit)
        was_rejected = self.key_rejected is not None
        parts.require_scheduler().resume(client)
        if was_rejected:
            self._publish(KeyRestored())
        if sinks is not None:
            await parts.delivery.swap_sinks(sinks)
            self._sinks = sinks
            self._note_sinks(parts)
        if old_client is not None:
            await old_client.close()
        log.info("configuration reloaded", source=config.source)

    async def _build_for_reload(
        self, config: Config, parts: _Parts
    ) -> tuple[ExecutionsClient, list[SinkHandle] | None]:
        """The new client, and the new sinks opened (None: unchanged); on failure, nothing is left open."""
        client = self._new_client(config)
        try:
            sinks = build_sinks(config.sinks) if config.sinks != self.config.sinks else None
            if sinks is not None:
                await parts.delivery.open_sinks(sinks)
        except BaseException:
            await client.close()
            raise
        return client, sinks

    def orphaned_outbox(self) -> dict[str, int]:
        """Results pending for a sink name that is not configured (an earlier config's), per name."""
        return self.store.orphaned_counts([h.name for h in self.delivery.sinks])

    def _note_sinks(self, parts: _Parts) -> None:
        """Note the sinks in the state file and warn, once per name, about results waiting for a sink
        that is no longer configured: no lane delivers them, so they would otherwise wait unseen."""
        names = [h.name for h in parts.delivery.sinks]
        try:
            parts.store.set_configured_sinks(names)
            orphans = parts.store.orphaned_counts(names)
        except StoreFault as exc:
            parts.gate.report(exc)
            return
        self.metrics.set_orphaned_outbox(sum(orphans.values()))
        for sink, count in orphans.items():
            log.warning(
                "results wait for a sink that is not configured",
                sink=sink,
                pending=count,
                hint=f"configure a sink named {sink!r} again to deliver them; `execmon dead-letters` lists them",
            )

    # -- the parts, for the front ends (live view, control API) --------------------------------

    @property
    def clock(self) -> Clock:
        return self._require_parts().clock

    @property
    def store(self) -> AnyStore:
        return self._require_parts().store

    @property
    def scheduler(self) -> Scheduler:
        return self._require_parts().require_scheduler()

    @property
    def budget(self) -> Budget:
        return self._require_parts().require_budget()

    @property
    def delivery(self) -> Delivery:
        return self._require_parts().delivery

    def outcomes(self, ids: Iterable[str]) -> dict[str, Outcome]:
        return self.store.results(ids)

    # -- the scheduler's listener ----------------------------------------------------------------

    def on_poll(self, execution_id: str, status: StatusRecord | None, error: str | None) -> None:
        self.metrics.request(status.status.value if status is not None else "error")
        parts = self._require_parts()
        state = parts.require_scheduler().export_state(execution_id)
        if state is not None:
            parts.store.save_poll(execution_id, state, status.raw if status else None, int(state.get("polls", 0)))
        if self._subscribers:
            self._publish(Polled(execution_id, status, error))

    async def on_terminal(self, event: TerminalEvent) -> None:
        parts = self._require_parts()
        record = build_result_record(event)
        try:
            finished = parts.delivery.submit_record(record, event)
        except StoreFault as exc:
            parts.gate.report(exc)
            raise  # the scheduler keeps the execution and asks again once the store records
        except LeaseLost:
            # Another replica holds it now (this one was paused or cut off): its result is theirs
            # to record; this one drops it, having written nothing.
            log.info("lease lost before the result was recorded", execution_id=event.execution_id)
            return
        if not finished.newly_terminal:
            return
        stamp = parse_iso(event.status.finished_at or "") if event.status is not None else None
        if stamp is not None:
            self.metrics.observe_detection_delay(max(0.0, event.observed_at - stamp))
        result = Result.from_record(record)
        for queue in self._waiters:
            queue.put_nowait(result)
        self._publish(Ended(result, event))

    def on_stall(self, event: StallEvent) -> None:
        parts = self._require_parts()
        try:
            added = parts.delivery.submit_event(build_stall_record(event))
        except StoreFault as exc:
            parts.gate.report(exc)
            raise  # the scheduler asks again at the next answer (same event_id)
        stalled = event.kind is StallKind.STALLED
        log.info(
            "execution stalled" if stalled else "execution resumed",
            execution_id=event.execution_id,
            stalled_for_s=round(event.stalled_for_s, 1),
            records=added,
        )
        self._publish(Stalled(event) if stalled else Resumed(event))

    def on_key_rejected(self, reason: str) -> None:
        # The front ends say it in their own words (watch: one line and exit 3; the daemon: a log
        # line and /healthz 503); a library caller gets KeyRejectedError from wait/results.
        log.debug("API key rejected; polling with this key has stopped", reason=reason)
        self._wake_waiters()
        self._publish(KeyRejected(reason))

    def on_throttled(self, retry_after_s: float | None) -> None:
        self.metrics.throttled()
        log.warning("throttled by the server (429); pausing the key", retry_after_s=retry_after_s)

    def on_store_fault(self, exc: StoreFault) -> None:
        self._require_parts().gate.report(exc)

    # -- helpers -------------------------------------------------------------------------------

    def _publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            subscriber(event)

    def _on_store_change(self, reason: str | None) -> None:
        scheduler = self._parts.scheduler if self._parts is not None else None
        self.metrics.set_store_healthy(reason is None)
        if reason is None:
            if scheduler is not None:
                scheduler.release_hold("store")
            self._publish(StoreRecovered())
        else:
            self.metrics.store_fault()
            if scheduler is not None:
                scheduler.hold("store")
            self._publish(StoreFaulted(reason))

    def _on_failure(self, failure: MonitorFailed) -> None:
        self._failed.set()
        self._wake_waiters()
        self._publish(Failed(failure))

    def _wake_waiters(self) -> None:
        for queue in self._waiters:
            queue.put_nowait(None)

    def _raise_if_cannot_finish(self, pending: set[str]) -> None:
        failure = self.failure
        if failure is not None:
            raise MonitorFailed(str(failure)) from failure.__cause__
        if self._closed:
            raise MonitorFailed("the Monitor was shut down before these executions ended")
        if self.key_rejected is not None:
            raise KeyRejectedError(self.key_rejected)
        missing = pending - self.store.tracked_among(pending) if pending else set()
        if missing:
            raise NotTrackedError(f"not tracked: {', '.join(sorted(missing)[:5])}; call track() first")

    def _failure_text(self) -> str | None:
        return None if self.failure is None else str(self.failure)

    def _store_fault_text(self) -> str | None:
        return None if self._parts is None else self._parts.gate.reason

    def _require_parts(self) -> _Parts:
        if self._parts is None:
            raise RuntimeError("the Monitor is not running: use `async with Monitor(...) as mon:`")
        return self._parts

    def _require_running(self) -> _Parts:
        if self.failure is not None:
            raise MonitorFailed(str(self.failure)) from self.failure.__cause__
        return self._require_parts()


@dataclasses.dataclass(slots=True)
class _Parts:
    """What a running Monitor holds; built in order by `__aenter__`."""

    clock: Clock
    store: AnyStore
    gate: StoreGate
    delivery: Delivery
    client: ExecutionsClient | None = None
    budget: Budget | None = None
    scheduler: Scheduler | None = None
    learning: LearningKeeper | None = None

    def require_scheduler(self) -> Scheduler:
        assert self.scheduler is not None, "the scheduler is built in __aenter__"
        return self.scheduler

    def require_budget(self) -> Budget:
        assert self.budget is not None, "the budget is built in __aenter__"
        return self.budget


def _seen_at(recent: Sequence[tuple[float, bool]], now: float, timeout_s: float) -> list[float]:
    """When the server saw each earlier request at the latest (epoch s, never after `now`).

    An unanswered request (the process died first) reached the server by its timeout at the
    latest, and before this process started at the very latest. A stamp after `now` was written
    before the wall clock stepped back: it counts as made now (still in the window: the safe side);
    taken as it is, it would hold the budget for the size of the step.
    """
    ahead = [stamp - now for stamp, _ in recent if stamp > now]
    if ahead:
        log.warning(
            "request history is stamped in the future (the wall clock stepped back); counted as made now",
            requests=len(ahead),
            ahead_s=round(max(ahead), 3),
        )
    return [min(stamp if done else stamp + timeout_s, now) for stamp, done in recent]


def _secret(value: str | Secret) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


def _config_from_keywords(
    base_url: str | None,
    api_key: str | Secret | None,
    rate_limit: str | None,
    policy: str | None,
    sinks: Sequence[str | Sink],
) -> Config:
    given = {"base_url": base_url, "rate_limit": rate_limit, "policy": policy}
    flags: dict[str, Any] = {_KEYWORD_KEYS[k]: v for k, v in given.items() if v is not None}
    specs = [s for s in sinks if isinstance(s, str)]
    if specs:
        flags["sinks"] = [parse_sink_spec(s) for s in specs]
    config = load_config(None, overrides=flags)
    return config if api_key is None else dataclasses.replace(config, env_api_key=_secret(api_key))


def _sink_objects(sinks: Sequence[str | Sink]) -> list[SinkHandle]:
    """Sink objects given to the constructor, with default delivery settings, named by class."""
    handles = []
    for index, sink in enumerate(sinks, start=1):
        if isinstance(sink, str):
            continue
        name = getattr(sink, "name", None) or f"{type(sink).__name__}#{index}"
        config = SinkConfig(type=type(sink).__name__, index=index, source="Monitor")
        handles.append(handle_for(sink, name, config, f"Monitor(sinks=...) #{index}"))
    return handles

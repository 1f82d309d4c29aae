"""The engine: one path for data, wired once for both `execmon watch` and `execmon run`.

    registry (SQLite) -> scheduler -> budget -> client -> outcome -> outbox (SQLite) -> delivery -> sinks

The engine owns the pieces' lifetimes and is the scheduler's listener: every poll is persisted,
and a terminal outcome is written to the outbox in the same transaction that marks the execution
terminal, before any sink sees it. Delivery then works from the outbox, so a crash at any moment
loses nothing; the jsonl sink drops what it already holds, so nothing is written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from monitor.api.client import ExecutionsClient
from monitor.api.models import StatusRecord
from monitor.clock import Clock, parse_iso
from monitor.config import Config
from monitor.delivery import Delivery
from monitor.records import Outcome, TerminalEvent
from monitor.schedule.budget import Budget
from monitor.schedule.policy import make_policy
from monitor.schedule.scheduler import Scheduler
from monitor.service.backend import EngineBackend
from monitor.service.control import TrackResult
from monitor.service.metrics import Metrics
from monitor.sinks.registry import SinkHandle, build_sinks
from monitor.state.rows import TrackedRow, TrackRequest
from monitor.state.store import Store

log = structlog.get_logger(__name__)

_METRICS_EVERY_S = 5.0
_OUTCOMES = tuple(o.value for o in Outcome)
StatusListener = Callable[[str, StatusRecord | None, str | None], None]


class Engine:
    """Config in, results out. An async context manager; `run()` is started by `__aenter__`."""

    def __init__(self, config: Config, *, state_path: str | Path | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.state_path = Path(state_path or config.state.path)
        self.key_rejected_reason: str | None = None
        self.terminal_listeners: list[Callable[[TerminalEvent], None]] = []
        self.status_listeners: list[StatusListener] = []
        self._task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._sinks: list[SinkHandle] = build_sinks(config.sinks)
        self._store: Store | None = None
        self._client: ExecutionsClient | None = None
        self._budget: Budget | None = None
        self._scheduler: Scheduler | None = None
        self._delivery: Delivery | None = None
        self._clock: Clock | None = None
        self.backend = EngineBackend(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._clock = Clock()
        self._store = Store.open(self.state_path)
        try:
            self._delivery = Delivery(self._store, self._sinks, self._clock, metrics=self.metrics)
            await self._delivery.start()
            self._client = self._new_client(self.config)
            self._budget = self._new_budget(self.config)
            self._scheduler = self._new_scheduler(self.config, self._client, self._budget)
            self._resume(self._store.load_active())
            self._task = asyncio.create_task(self._scheduler.run(), name="execmon-scheduler")
            self._metrics_task = asyncio.create_task(self._refresh_metrics(), name="execmon-metrics")
        except BaseException:
            await self._close_parts()
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if self._metrics_task is not None:
            self._metrics_task.cancel()  # it reads the store, which is closed below
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_task
            self._metrics_task = None
        if self._scheduler is not None:
            await self._scheduler.stop(grace_s / 2)
        if self._task is not None:
            self._task.cancel()  # polls are drained by stop(); a run() not started before stop() would never end
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._delivery is not None:
            await self._delivery.drain(timeout=max(0.0, deadline - loop.time()))
        await self._close_parts()

    async def _close_parts(self) -> None:
        if self._delivery is not None:
            await self._delivery.close()
            self._delivery = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._store is not None:
            self._store.close()
            self._store = None

    async def _refresh_metrics(self) -> None:
        """Gauges that are cheaper to sample than to keep exact on every change."""
        while True:
            store, budget = self._require_store(), self.budget
            stats = budget.stats()
            self.metrics.set_budget(stats.used, stats.free)
            self.metrics.set_tracked(
                {state: store.count_executions(state) for state in ("pending", "running", *_OUTCOMES)}
            )
            await asyncio.sleep(_METRICS_EVERY_S)

    # -- building the parts --------------------------------------------------------------------

    def _new_client(self, config: Config) -> ExecutionsClient:
        return ExecutionsClient(
            config.api.base_url,
            config.api_key(),
            timeout_s=config.api.request_timeout_s,
            max_connections=config.api.max_connections,
            retry_after_cap_s=config.api.retry_after_cap_s,
        )

    def _new_budget(self, config: Config) -> Budget:
        """The key's budget, primed with what the previous process spent (persisted per request)."""
        store, clock = self._require_store(), self._require_clock()
        now = clock.wall()
        timeout = config.api.request_timeout_s
        history = []
        for stamp, done in store.recent_requests(now - config.api.rate_limit.window_s - timeout):
            # An unanswered request (the process died first) reached the server by its timeout at the
            # latest, and before this process started at the very latest.
            seen_at = stamp if done else min(stamp + timeout, now)
            history.append(clock.to_loop(seen_at))
        return Budget(
            config.api.rate_limit,
            clock,
            history=history,
            on_request_started=lambda t: store.record_request(clock.wall(t)),
            on_request_done=self._request_done,
        )

    def _request_done(self, row: object, loop_t: float | None) -> None:
        if self._store is not None and isinstance(row, int) and loop_t is not None:
            self._store.complete_request(row, self._require_clock().wall(loop_t))

    def _new_scheduler(self, config: Config, client: ExecutionsClient, budget: Budget) -> Scheduler:
        polling = config.polling
        return Scheduler(
            client,
            budget,
            make_policy(polling.policy),
            self._require_clock(),
            max_in_flight=polling.max_in_flight,
            not_found_confirmations=polling.not_found_confirmations,
            not_found_min_span_s=polling.not_found_min_span_s,
            error_backoff_base_s=polling.error_backoff_base_s,
            error_backoff_cap_s=polling.error_backoff_cap_s,
            listener=self,
        )

    def _resume(self, rows: Iterable[TrackedRow]) -> None:
        scheduler = self._require_scheduler()
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
            count += 1
        if count:
            log.info("resumed tracked executions", count=count, state=str(self.state_path))

    # -- what sources call ---------------------------------------------------------------------

    def track(
        self,
        ids: Iterable[str],
        *,
        deadline_s: float | None = None,
        group: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> TrackResult:
        """Track validated IDs (persisted first, then scheduled). Tracked ones are left as they are."""
        store, clock, scheduler = self._require_store(), self._require_clock(), self._require_scheduler()
        wanted = list(dict.fromkeys(ids))
        if deadline_s is None and self.config.polling.deadline_s > 0:
            deadline_s = self.config.polling.deadline_s
        now = clock.wall()
        deadline_at = None if deadline_s is None else now + deadline_s
        label_map = dict(labels or {})
        requests = [
            TrackRequest(i, tracked_since=now, deadline_at=deadline_at, group=group, labels=label_map) for i in wanted
        ]
        added = store.track_many(requests)
        for execution_id in added:
            scheduler.track(execution_id, deadline_s=deadline_s, group=group, labels=label_map)
        fresh = set(added)
        return TrackResult(added, [i for i in wanted if i not in fresh])

    def untrack(self, execution_id: str) -> bool:
        self._require_scheduler().untrack(execution_id)
        return self._require_store().untrack(execution_id)

    @property
    def clock(self) -> Clock:
        return self._require_clock()

    @property
    def store(self) -> Store:
        return self._require_store()

    @property
    def scheduler(self) -> Scheduler:
        return self._require_scheduler()

    @property
    def budget(self) -> Budget:
        if self._budget is None:
            raise RuntimeError("the engine is not running")
        return self._budget

    @property
    def delivery(self) -> Delivery:
        if self._delivery is None:
            raise RuntimeError("the engine is not running")
        return self._delivery

    def health(self) -> tuple[bool, str | None]:
        if self.key_rejected_reason is not None:
            return False, self.key_rejected_reason
        return True, None

    async def reload(self, config: Config) -> None:
        """Apply a new config (key, base URL, rate limit, sinks) without losing state; polling settings
        need a restart. Everything that can fail is built before anything is swapped."""
        sinks = build_sinks(config.sinks) if config.sinks != self.config.sinks else None
        client = self._new_client(config)
        old_client = self._client
        self.config = config
        self._client = client
        if config.api.rate_limit != self.budget.rate:
            self.budget.set_rate(config.api.rate_limit)
        self._require_scheduler().resume(client)
        self.key_rejected_reason = None
        if sinks is not None:
            await self.delivery.replace_sinks(sinks)
            self._sinks = sinks
        if old_client is not None:
            await old_client.close()
        log.info("configuration reloaded", source=config.source)

    # -- the scheduler's listener ----------------------------------------------------------------

    def on_poll(self, execution_id: str, status: StatusRecord | None, error: str | None) -> None:
        self.metrics.request(status.status.value if status is not None else "error")
        scheduler, store = self._require_scheduler(), self._require_store()
        state = scheduler.export_state(execution_id)
        if state is not None:
            store.save_poll(execution_id, state, status.raw if status else None, int(state.get("polls", 0)))
        for listener in self.status_listeners:
            listener(execution_id, status, error)

    async def on_terminal(self, event: TerminalEvent) -> None:
        self.delivery.submit(event)
        finished = parse_iso(event.status.finished_at or "") if event.status is not None else None
        if finished is not None:
            self.metrics.observe_detection_delay(max(0.0, event.observed_at - finished))
        for listener in self.terminal_listeners:
            listener(event)

    def on_key_rejected(self) -> None:
        self.key_rejected_reason = "the API key was rejected (401): fix the key and reload (SIGHUP)"
        log.error("API key rejected; polling with this key has stopped", hint="fix the key, then reload")
        for listener in self.status_listeners:
            listener("", None, "key_rejected")

    def on_throttled(self, retry_after_s: float | None) -> None:
        self.metrics.throttled()
        log.warning("throttled by the server (429); pausing the key", retry_after_s=retry_after_s)

    # -- helpers -----------------------------------------------------------------------------

    def _require_store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the engine is not running")
        return self._store

    def _require_clock(self) -> Clock:
        if self._clock is None:
            raise RuntimeError("the engine is not running")
        return self._clock

    def _require_scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the engine is not running")
        return self._scheduler

    def outcomes(self, ids: Iterable[str]) -> dict[str, Outcome]:
        return self._require_store().results(ids)

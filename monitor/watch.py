"""`execmon watch`: track a fixed set of IDs until each one's result has reached every sink.

A thin front end over `Monitor` (the one engine): without `--state` the Monitor keeps its state in
memory; with it, in that SQLite file, so that a killed watch resumes. The watch ends when every
ID is terminal and nothing deliverable is left in the outbox. It returns 0 (all completed) or 1;
errors (a rejected key, a Monitor that cannot go on) are raised and mapped by `monitor.cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field

from monitor.api.client import check_reachable
from monitor.config import Config
from monitor.engine import Monitor
from monitor.errors import KeyRejectedError, MonitorFailed
from monitor.events import Ended, Event, Polled, Resumed, Stalled
from monitor.logs import get_logger
from monitor.records import Outcome
from monitor.watch_view import LiveView, WatchStats

log = get_logger(__name__)

EXIT_OK, EXIT_NOT_ALL_COMPLETED, EXIT_INTERRUPTED = 0, 1, 130
_TICK_S = 0.2


@dataclass(slots=True)
class WatchOptions:
    ids: list[str]
    state_path: str | None = None
    group: str | None = None
    timeout_s: float | None = None
    fail_fast: bool = False
    quiet: bool = False
    live: bool = False
    rejected: list[str] = field(default_factory=list)


class Watch:
    """One run of `execmon watch` on a running Monitor."""

    def __init__(self, monitor: Monitor, options: WatchOptions) -> None:
        self.monitor = monitor
        self.options = options
        self.ids = options.ids
        self._id_set = frozenset(options.ids)
        self.stats = WatchStats(total=len(options.ids), rate=monitor.config.api.rate_limit)
        self._last_state: dict[str, str] = {}
        self._failed_early: Outcome | None = None
        monitor.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Polled):
            self._on_status(event)
        elif isinstance(event, Ended):
            self._on_ended(event)
        elif isinstance(event, Stalled | Resumed):
            self.stats.record_stall(event.event)  # the engine logs it; the live view marks it

    def _on_status(self, polled: Polled) -> None:
        execution_id, status, error = polled.execution_id, polled.status, polled.error
        self.stats.requests += 1
        if status is not None:
            self.stats.progress[execution_id] = status.progress or 0
        state = status.raw_status if status is not None else f"error ({error})"
        if self._last_state.get(execution_id) != state:
            self._last_state[execution_id] = state
            if not self.options.quiet and not self.options.live:
                progress = status.progress if status is not None else None
                log.info("execution state", execution_id=execution_id, state=state, progress=progress)

    def _on_ended(self, ended: Ended) -> None:
        event = ended.event
        self.stats.record_outcome(event)
        if not self.options.quiet and not self.options.live:
            log.info("execution finished", execution_id=event.execution_id, outcome=event.outcome.value)
        if self.options.fail_fast and event.outcome is not Outcome.COMPLETED and self._failed_early is None:
            self._failed_early = event.outcome

    async def run(self) -> int:
        monitor = self.monitor
        result = monitor.track_valid(self.ids, deadline_s=self.options.timeout_s, group=self.options.group)
        if result.already_tracked:
            known = monitor.outcomes(result.already_tracked)
            log.info("resuming", already_tracked=len(result.already_tracked), already_finished=len(known))
        self.stats.preload(monitor.outcomes(self.ids))
        view = LiveView(self.stats) if self.options.live else None
        with view if view is not None else contextlib.nullcontext():
            code = await self._wait(view)
        # The summary comes after the live view has drawn its last frame.
        return self._finish(self.monitor.outcomes(self.ids)) if code is None else code

    async def _wait(self, view: LiveView | None) -> int | None:
        """Until every ID is terminal and delivered (None), or an early exit code."""
        monitor = self.monitor
        while True:
            if view is not None:
                self.stats.budget_used = monitor.budget.stats().used
                self.stats.slowest_eta_s = self._slowest_eta_s()
                view.refresh()
            self._raise_if_cannot_go_on()
            if self._failed_early is not None:
                await monitor.delivery.drain(timeout=monitor.config.control.grace_s)
                log.error("stopping early (--fail-fast)", outcome=self._failed_early.value)
                return EXIT_NOT_ALL_COMPLETED
            # The in-memory outcomes (preloaded + listener) say when to ask the store; the store
            # (terminal rows, nothing pending in the outbox) has the last word.
            if self.stats.outcomes.keys() >= self._id_set and self._store_says_done():
                return None
            await asyncio.sleep(_TICK_S)

    def _raise_if_cannot_go_on(self) -> None:
        monitor = self.monitor
        if monitor.failure is not None:
            raise MonitorFailed(f"{monitor.failure}; run the same command again to resume") from None
        if monitor.key_rejected is not None:
            key_source = monitor.config.api.api_key_file or monitor.config.api.api_key_env
            raise KeyRejectedError(f"{monitor.key_rejected}: put a valid key in {key_source}")  # 401 or 403

    def _store_says_done(self) -> bool:
        # Only rows of the configured sinks count: no lane delivers an orphan (a sink name of an
        # earlier run), so waiting for one would never end. Those are reported by `_finish`.
        store = self.monitor.store
        if len(store.results(self.ids)) != len(self.ids):
            return False
        return all(store.pending_count(sink.name) == 0 for sink in self.monitor.delivery.sinks)

    def _slowest_eta_s(self) -> float | None:
        """Seconds until the latest predicted finish among the running executions, if any is known."""
        scheduler, now = self.monitor.scheduler, self.monitor.clock.wall()
        etas = [
            float(snap["eta"])
            for execution_id in self.ids
            if execution_id not in self.stats.outcomes
            and (snap := scheduler.snapshot(execution_id)) is not None
            and isinstance(snap.get("eta"), float)
        ]
        return max(0.0, max(etas) - now) if etas else None

    def _finish(self, outcomes: dict[str, Outcome]) -> int:
        self._report_orphans()
        dead = self.monitor.store.dead_letters()
        counts = Counter(o.value for o in outcomes.values())
        if self.options.live:
            self.stats.print_summary(counts, dead=len(dead))
        elif not self.options.quiet:
            log.info("watch finished", **self.stats.summary(counts, dead=len(dead)))
        if dead:
            for row in dead[:10]:
                log.error(
                    "result not delivered (dead letter)",
                    sink=row.sink,
                    event_id=row.event_id,
                    execution_id=row.execution_id,
                    reason=row.last_error,
                )
            log.error("some results could not be delivered", dead_letters=len(dead), hint=self._dead_letter_hint())
            return EXIT_NOT_ALL_COMPLETED
        if all(o is Outcome.COMPLETED for o in outcomes.values()) and not self.options.rejected:
            return EXIT_OK
        return EXIT_NOT_ALL_COMPLETED

    def _report_orphans(self) -> None:
        """Results left pending for a sink this watch does not have (they stay in the state file)."""
        for sink, count in self.monitor.orphaned_outbox().items():
            log.warning(
                "results left waiting for a sink this watch does not have",
                sink=sink,
                pending=count,
                hint=f"run with a sink named {sink!r} (a [[sinks]] table's `name`) to deliver them",
            )

    def _dead_letter_hint(self) -> str:
        path = self.options.state_path
        if path is None:
            return "without --state they end with this process; run with --state FILE to keep them for a retry"
        return f"`execmon dead-letters --state {path}` lists them; `--retry` sends them again"


async def run_watch(config: Config, options: WatchOptions) -> int:
    """Run a watch to its end; the state is in memory unless `--state` was given."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
    await check_reachable(config.api.base_url, config.api.request_timeout_s)
    try:
        async with Monitor(config=config, state=options.state_path) as monitor:
            return await Watch(monitor, options).run()
    except asyncio.CancelledError:
        print("execmon watch: interrupted; state is kept when --state is given", file=sys.stderr)
        return EXIT_INTERRUPTED

"""`execmon watch`: track a fixed set of IDs until each one's result has reached every sink.

The same engine as the daemon (SQLite state, outbox, delivery); without `--state` the state lives
in a temporary file that is removed at the end. The watch ends when every ID is terminal and
nothing deliverable is left in the outbox; the exit status follows the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from monitor.api.client import check_reachable
from monitor.api.models import StatusRecord
from monitor.config import Config
from monitor.engine import Engine
from monitor.records import Outcome, TerminalEvent
from monitor.watch_view import LiveView, WatchStats

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_NOT_ALL_COMPLETED, EXIT_KEY_REJECTED, EXIT_INTERRUPTED = 0, 1, 3, 130
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
    """One run of `execmon watch` on an engine."""

    def __init__(self, engine: Engine, options: WatchOptions) -> None:
        self.engine = engine
        self.options = options
        self.ids = options.ids
        self._id_set = frozenset(options.ids)
        self.stats = WatchStats(total=len(options.ids), rate=engine.config.api.rate_limit)
        self._last_state: dict[str, str] = {}
        self._failed_early: Outcome | None = None
        engine.status_listeners.append(self._on_status)
        engine.terminal_listeners.append(self._on_terminal)

    def _on_status(self, execution_id: str, status: StatusRecord | None, error: str | None) -> None:
        if not execution_id:
            return
        self.stats.requests += 1
        if status is not None:
            self.stats.progress[execution_id] = status.progress or 0
        state = status.raw_status if status is not None else f"error ({error})"
        if self._last_state.get(execution_id) != state:
            self._last_state[execution_id] = state
            if not self.options.quiet and not self.options.live:
                progress = status.progress if status is not None else None
                log.info("execution state", execution_id=execution_id, state=state, progress=progress)

    def _on_terminal(self, event: TerminalEvent) -> None:
        self.stats.record_outcome(event)
        if not self.options.quiet and not self.options.live:
            log.info("execution finished", execution_id=event.execution_id, outcome=event.outcome.value)
        if self.options.fail_fast and event.outcome is not Outcome.COMPLETED and self._failed_early is None:
            self._failed_early = event.outcome

    async def run(self) -> int:
        engine = self.engine
        result = engine.track(self.ids, deadline_s=self.options.timeout_s, group=self.options.group)
        if result.already_tracked:
            known = engine.outcomes(result.already_tracked)
            log.info("resuming", already_tracked=len(result.already_tracked), already_finished=len(known))
        self.stats.preload(engine.outcomes(self.ids))
        view = LiveView(self.stats) if self.options.live else None
        with view if view is not None else contextlib.nullcontext():
            code = await self._wait(view)
        # The summary comes after the live view has drawn its last frame.
        return self._finish(self.engine.outcomes(self.ids)) if code is None else code

    async def _wait(self, view: LiveView | None) -> int | None:
        """Until every ID is terminal and delivered (None), or an early exit code."""
        engine = self.engine
        while True:
            if view is not None:
                self.stats.budget_used = engine.budget.stats().used
                self.stats.slowest_eta_s = self._slowest_eta_s()
                view.refresh()
            if engine.key_rejected_reason is not None:
                log.error("the API key was rejected (401): set EXECMON_API_KEY to a valid key")
                return EXIT_KEY_REJECTED
            if self._failed_early is not None:
                await engine.delivery.drain(timeout=engine.config.control.grace_s)
                log.error("stopping early (--fail-fast)", outcome=self._failed_early.value)
                return EXIT_NOT_ALL_COMPLETED
            # The in-memory outcomes (preloaded + listener) say when to ask the store; the store
            # (terminal rows, nothing pending in the outbox) has the last word.
            if self.stats.outcomes.keys() >= self._id_set and self._store_says_done():
                return None
            await asyncio.sleep(_TICK_S)

    def _store_says_done(self) -> bool:
        store = self.engine.store
        return len(store.results(self.ids)) == len(self.ids) and store.pending_count() == 0

    def _slowest_eta_s(self) -> float | None:
        """Seconds until the latest predicted finish among the running executions, if any is known."""
        scheduler, now = self.engine.scheduler, self.engine.clock.wall()
        etas = [
            float(snap["eta"])
            for execution_id in self.ids
            if execution_id not in self.stats.outcomes
            and (snap := scheduler.snapshot(execution_id)) is not None
            and isinstance(snap.get("eta"), float)
        ]
        return max(0.0, max(etas) - now) if etas else None

    def _finish(self, outcomes: dict[str, Outcome]) -> int:
        dead = self.engine.store.dead_letters()
        counts = Counter(o.value for o in outcomes.values())
        if self.options.live:
            self.stats.print_summary(counts, dead=len(dead))
        elif not self.options.quiet:
            log.info("watch finished", **self.stats.summary(counts, dead=len(dead)))
        if dead:
            for row in dead[:10]:
                log.error(
                    "result not delivered (dead letter)", sink=row.sink, event_id=row.event_id, reason=row.last_error
                )
            log.error(
                "some results could not be delivered",
                dead_letters=len(dead),
                hint="`execmon dead-letters --state PATH` lists them; `--retry` sends them again",
            )
            return EXIT_NOT_ALL_COMPLETED
        if all(o is Outcome.COMPLETED for o in outcomes.values()) and not self.options.rejected:
            return EXIT_OK
        return EXIT_NOT_ALL_COMPLETED


async def run_watch(config: Config, options: WatchOptions) -> int:
    """Run a watch to its end; the state file is temporary unless `--state` was given."""
    with contextlib.ExitStack() as stack:
        state_path = options.state_path
        if state_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="execmon-watch-"))
            state_path = str(Path(tmp) / "watch.db")
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
        await check_reachable(config.api.base_url, config.api.request_timeout_s)
        try:
            async with Engine(config, state_path=state_path) as engine:
                return await Watch(engine, options).run()
        except asyncio.CancelledError:
            print("execmon watch: interrupted; state is kept when --state is given", file=sys.stderr)
            return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED

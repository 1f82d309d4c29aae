"""The terminal side of `execmon watch`: a live view on a TTY, and the closing summary.

Everything here writes to stderr, so that stdout carries result records only.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from monitor.clock import parse_iso
from monitor.rates import RateLimit, format_rate_limit
from monitor.records import Outcome, StallEvent, StallKind, TerminalEvent

_OUTCOME_STYLE = {
    Outcome.COMPLETED: "green",
    Outcome.FAILED: "red",
    Outcome.CANCELLED: "yellow",
    Outcome.NOT_FOUND: "magenta",
    Outcome.TIMED_OUT: "red",
}


@dataclass
class WatchStats:
    """What the view shows: per-ID progress and outcome, totals, budget use, detection delays."""

    total: int
    rate: RateLimit | None  # None: no limit
    requests: int = 0
    budget_used: int = 0
    progress: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    delays_s: list[float] = field(default_factory=list)
    slowest_eta_s: float | None = None
    stalled: dict[str, float] = field(default_factory=dict)  # execution -> its last change (epoch s)

    def preload(self, outcomes: dict[str, Outcome]) -> None:
        self.outcomes.update(outcomes)

    def record_stall(self, event: StallEvent) -> None:
        if event.kind is StallKind.STALLED:
            self.stalled[event.execution_id] = event.last_change_at
        else:
            self.stalled.pop(event.execution_id, None)

    def record_outcome(self, event: TerminalEvent) -> None:
        self.stalled.pop(event.execution_id, None)
        self.outcomes[event.execution_id] = event.outcome
        finished = parse_iso(event.status.finished_at or "") if event.status is not None else None
        if finished is not None:
            self.delays_s.append(max(0.0, event.observed_at - finished))

    def summary(self, counts: Counter[str], *, dead: int) -> dict[str, object]:
        """The closing figures as fields of one structured log line (for a pipe)."""
        fields: dict[str, object] = {"outcomes": dict(sorted(counts.items())), "requests": self.requests}
        if self.delays_s:
            fields["detection_delay_mean_s"] = round(statistics.fmean(self.delays_s), 2)
            fields["detection_delay_max_s"] = round(max(self.delays_s), 2)
        fields["dead_letters"] = dead
        return fields

    def print_summary(self, counts: Counter[str], *, dead: int) -> None:
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        console.print(f"[bold]execmon watch:[/bold] {sum(counts.values())} executions: {parts}")
        if self.delays_s:
            delays = sorted(self.delays_s)
            p90 = delays[min(len(delays) - 1, int(0.9 * len(delays)))]
            console.print(
                f"detection delay: mean {statistics.fmean(delays):.1f} s, p90 {p90:.1f} s, "
                f"max {delays[-1]:.1f} s (from the server's finish time to the result)"
            )
        console.print(f"requests: {self.requests} (budget {format_rate_limit(self.rate)}); dead letters: {dead}")


class LiveView:
    """A rich Live display on stderr: one progress bar per execution (as many as fit), totals, budget."""

    def __init__(self, stats: WatchStats) -> None:
        self.stats = stats
        self.console = Console(stderr=True)
        # Live captures sys.stdout by default, which would swallow the stdout sink's records
        # (`execmon watch > out.jsonl` wrote nothing): stdout is for records only, never touched.
        self._live = Live(
            console=self.console,
            refresh_per_second=4,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.refresh()
        self._live.__exit__(exc_type, exc, tb)

    def refresh(self) -> None:
        self._live.update(self._render())

    def _render(self) -> Group:
        stats = self.stats
        rows = max(3, self.console.size.height - 6)
        # Stalled runs first: they are what someone watching wants to see.
        running = sorted(
            (i for i in stats.progress if i not in stats.outcomes),
            key=lambda i: (i not in stats.stalled, -stats.progress[i]),
        )
        table = Table.grid(padding=(0, 1))
        now = time.time()  # display only: wall time is fine
        for execution_id in running[:rows]:
            pct = stats.progress[execution_id]
            since = stats.stalled.get(execution_id)
            bar = ProgressBar(total=100, completed=pct, width=30, complete_style="yellow" if since else "bar.complete")
            mark = Text(f"stalled {_duration(now - since)}", style="yellow") if since is not None else Text("")
            table.add_row(execution_id, bar, f"{pct:3d}%", mark)
        hidden = len(running) - rows
        counts = Counter(o.value for o in stats.outcomes.values())
        done = sum(counts.values())
        totals = Text(f"{done}/{stats.total} finished  ")
        for outcome, style in _OUTCOME_STYLE.items():
            if counts.get(outcome.value):
                totals.append(f"{outcome.value} {counts[outcome.value]}  ", style=style)
        if stats.stalled:
            totals.append(f"stalled {len(stats.stalled)}  ", style="yellow")
        rate = stats.rate
        budget = "no limit" if rate is None else f"{stats.budget_used}/{rate.limit} per {rate.window_s:g}s"
        totals.append(f"| budget {budget} | requests {stats.requests}")
        if stats.slowest_eta_s is not None:
            eta = _duration(stats.slowest_eta_s) if stats.slowest_eta_s >= 1 else "now (due)"
            totals.append(f" | slowest ends in ~{eta}")
        parts: list[Table | Text] = [table]
        if hidden > 0:
            parts.append(Text(f"... and {hidden} more running", style="dim"))
        parts.append(totals)
        return Group(*parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")

"""The live view and the closing summary of `execmon watch`, rendered to text."""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections import Counter

import pytest
from rich.console import Console

from monitor.api.models import ExecutionStatus, StatusRecord
from monitor.clock import parse_iso
from monitor.rates import RateLimit
from monitor.records import Outcome, StallEvent, StallKind, TerminalEvent
from monitor.watch_view import LiveView, WatchStats


def _stats() -> WatchStats:
    stats = WatchStats(total=3, rate=RateLimit(30, 60.0), requests=7, budget_used=12)
    stats.progress.update({"exec_a": 40, "exec_b": 90, "exec_c": 100})
    finished = "2025-11-11T10:30:30Z"
    status = StatusRecord("exec_c", ExecutionStatus.FAILED, "failed", failed_at=finished)
    observed = (parse_iso(finished) or 0.0) + 4.0
    stats.record_outcome(TerminalEvent("exec_c", Outcome.FAILED, observed, observed - 100, 3, status))
    return stats


def _render(stats: WatchStats, height: int = 20) -> str:
    view = LiveView(stats)
    view.console = Console(file=io.StringIO(), width=120, height=height, force_terminal=False)
    view.console.print(view._render())
    out = view.console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def test_live_view_shows_running_bars_totals_budget_and_eta() -> None:
    stats = _stats()
    stats.slowest_eta_s = 125.0
    text = _render(stats)
    lines = text.splitlines()
    assert lines[0].startswith("exec_b")
    assert "90%" in lines[0]
    assert lines[1].startswith("exec_a")
    assert "40%" in lines[1]
    assert "exec_c" not in text  # finished: counted, no bar
    assert "1/3 finished" in text
    assert "failed 1" in text
    assert "budget 12/30 per 60s" in text
    assert "requests 7" in text
    assert "slowest ends in ~2m05s" in text


def test_live_view_says_how_many_bars_did_not_fit() -> None:
    stats = WatchStats(total=50, rate=RateLimit(30, 60.0))
    stats.progress.update({f"exec_{i:02d}": i for i in range(50)})
    text = _render(stats, height=10)
    assert "... and 46 more running" in text


def test_summary_fields_for_a_pipe_carry_the_delays() -> None:
    stats = _stats()
    fields = stats.summary(Counter({"failed": 1, "completed": 2}), dead=0)
    assert fields == {
        "outcomes": {"completed": 2, "failed": 1},
        "requests": 7,
        "detection_delay_mean_s": 4.0,
        "detection_delay_max_s": 4.0,
        "dead_letters": 0,
    }


def test_live_view_on_a_terminal_leaves_stdout_to_the_records(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(
        "monitor.watch_view.Console", lambda **_: Console(file=screen, force_terminal=True, width=100, height=20)
    )
    records = io.StringIO()
    monkeypatch.setattr(sys, "stdout", records)
    errors = io.StringIO()
    monkeypatch.setattr(sys, "stderr", errors)
    with LiveView(_stats()) as view:
        assert view.console.is_terminal
        assert sys.stdout is records  # rich.Live would put its proxy here by default
        print('{"event_id": "ev_1"}')
        assert sys.stderr is errors  # log lines write to stderr directly
    assert records.getvalue() == '{"event_id": "ev_1"}\n'
    assert "1/3 finished" in screen.getvalue()
    assert "ev_1" not in screen.getvalue()


def test_live_view_lists_stalled_runs_first_and_says_for_how_long() -> None:
    stats = _stats()
    now = time.time()
    event = StallEvent(StallKind.STALLED, "exec_a", "2025-11-11T10:00:00Z", now - 1500, now, 600.0, 40)
    stats.record_stall(event)
    lines = _render(stats).splitlines()
    assert lines[0].startswith("exec_a")  # stalled: first, though exec_b is further along
    assert "stalled 25m" in lines[0]
    assert "stalled 1" in _render(stats)
    stats.record_stall(dataclasses.replace(event, kind=StallKind.RESUMED, resumed_at=now))
    assert _render(stats).splitlines()[0].startswith("exec_b")
    assert "stalled" not in _render(stats)

"""Stall detection at unit level: the detector, its records, its persistence, the policy's share.

No loop and no server: answers are built by hand at chosen loop times (the simulator's own
stalls are exercised by tests/test_stall_monitor.py and tests/test_e2e_stalls.py).
"""

from __future__ import annotations

import asyncio
import math
from typing import cast

import pytest

from monitor.api.models import ExecutionStatus, StatusRecord
from monitor.clock import Clock, iso_utc
from monitor.config import ConfigError, load_config
from monitor.config_values import SinkEvents
from monitor.records import StallEvent, StallKind, build_stall_record
from monitor.schedule import stalls
from monitor.schedule.adaptive import STALLED_BOOST, AdaptivePolicy
from monitor.schedule.persist import export_state, restore_state
from monitor.schedule.stalls import StallDetector
from monitor.schedule.state import ExecState
from monitor.sinks.base import wants
from monitor.state.store import Store, TrackRequest

WALL0 = 1_760_000_000.0  # wall time of loop time 0


class _Loop:
    """All a Clock reads of its loop: the time (always 0 here; tests pass `now` explicitly)."""

    def time(self) -> float:
        return 0.0


CLOCK = Clock(cast(asyncio.AbstractEventLoop, _Loop()), wall_anchor=WALL0)


def answer(progress: int, changed_at: float | None, step: str = "Analyzing data") -> StatusRecord:
    """A running answer whose updated_at is loop time `changed_at` (None: the API gives none)."""
    stamp = None if changed_at is None else iso_utc(WALL0 + changed_at)
    return StatusRecord("exec_a", ExecutionStatus.RUNNING, "running", progress, step, updated_at=stamp)


class Run:
    """One execution polled every `every` seconds; `poll` returns the event the answer calls for,
    applied as the scheduler applies it once the record is written."""

    def __init__(self, detector: StallDetector, kind: str | None = None, name: str = "exec_a") -> None:
        self.detector = detector
        self.state = ExecState(name, 0.0, labels={"kind": kind} if kind else None)
        self.events: list[StallEvent] = []

    def poll(self, now: float, status: StatusRecord) -> StallEvent | None:
        event = self.detector.observe(self.state, status, now)
        if event is not None:
            self.detector.applied(self.state, event)
            self.events.append(event)
        self.state.last_poll = now
        return event

    def moving(self, start: float, end: float, every: float, gap: float, kind_progress: int = 10) -> None:
        """Polls from start to end; the run changes every `gap` seconds."""
        now = start
        while now < end:
            last = math.floor(now / gap) * gap
            self.poll(now, answer(kind_progress + int(now // gap) % 80, last))
            now += every


def test_a_fixed_threshold_gives_one_stalled_and_one_resumed_record_per_freeze() -> None:
    detector = StallDetector(CLOCK, stall_after_s=60.0)
    run = Run(detector)
    run.poll(0.0, answer(10, 0.0))
    run.poll(10.0, answer(12, 8.0))  # moving
    for now in (20.0, 40.0, 60.0):
        assert run.poll(now, answer(12, 8.0)) is None  # frozen since 8, not for 60 s yet
    stalled = run.poll(70.0, answer(12, 8.0))
    assert stalled is not None
    assert stalled.kind is StallKind.STALLED
    assert stalled.last_change_at == WALL0 + 8.0
    assert stalled.stalled_for_s == pytest.approx(62.0)
    assert stalled.stall_after_s == 60.0
    for now in (80.0, 200.0, 900.0):
        assert run.poll(now, answer(12, 8.0)) is None  # one record per freeze, however long
    resumed = run.poll(950.0, answer(13, 940.0))
    assert resumed is not None
    assert resumed.kind is StallKind.RESUMED
    assert resumed.freeze == stalled.freeze
    assert resumed.resumed_at == WALL0 + 940.0
    assert resumed.stalled_for_s == pytest.approx(932.0)
    assert run.poll(960.0, answer(14, 955.0)) is None  # resumed once
    again = run.poll(1100.0, answer(14, 955.0))  # a second freeze is a new stall
    assert again is not None
    assert again.kind is StallKind.STALLED
    assert again.freeze != stalled.freeze
    assert [e.kind for e in run.events] == [StallKind.STALLED, StallKind.RESUMED, StallKind.STALLED]


def test_records_have_the_contract_shape_and_ids_stable_per_freeze() -> None:
    event = StallEvent(
        StallKind.STALLED, "exec_a", "2025-11-11T10:00:00Z", WALL0, WALL0 + 1800, 600.0, 40, "Step", None, "g", {}
    )
    record = build_stall_record(event)
    assert {"event_id", "kind", "execution_id", "progress", "current_step", "last_change_at", "stalled_for_s"} <= set(
        record
    )
    shown = (record["kind"], record["progress"], record["stalled_for_s"], record["group"])
    assert shown == ("stalled", 40, 1800.0, "g")
    later = StallEvent(StallKind.STALLED, "exec_a", "2025-11-11T10:00:00Z", WALL0, WALL0 + 9000, 1200.0)
    assert build_stall_record(later)["event_id"] == record["event_id"]  # the same freeze, seen again
    resumed = StallEvent(StallKind.RESUMED, "exec_a", "2025-11-11T10:00:00Z", WALL0, WALL0 + 9000, 0.0)
    assert build_stall_record(resumed)["event_id"] != record["event_id"]
    assert wants(record, on=(), events=("stalled",))
    assert not wants(record, on=(), events=("execution", "group"))


def test_without_updated_at_a_new_progress_value_is_the_change() -> None:
    detector = StallDetector(CLOCK, stall_after_s=60.0)
    run = Run(detector)
    run.poll(0.0, answer(10, None))
    run.poll(30.0, answer(11, None))
    assert run.poll(80.0, answer(11, None)) is None  # unchanged since the poll at 30
    stalled = run.poll(95.0, answer(11, None))
    assert stalled is not None
    assert stalled.last_change_at == WALL0 + 30.0


def test_auto_learns_a_threshold_per_kind_and_never_goes_below_ten_minutes() -> None:
    detector = StallDetector(CLOCK)  # auto
    assert detector.threshold("etl", now=0.0) == stalls.COLD_S  # nothing learned yet
    for index in range(20):
        Run(detector, "etl", f"exec_e{index}").moving(0.0, 3000.0, every=30.0, gap=5.0)
        Run(detector, "train", f"exec_t{index}").moving(0.0, 3000.0, every=30.0, gap=400.0)
    assert detector.threshold("etl", now=3000.0) == stalls.FLOOR_S  # 3 x a few seconds: the floor
    train = detector.threshold("train", now=3000.0)
    assert 1000.0 < train < 1500.0  # 3 x its usual longest stretch (~400 s), per kind
    assert detector.threshold(None, now=3000.0) == stalls.COLD_S  # the pool without a kind: nothing yet


def test_auto_trusts_a_pool_only_once_it_has_watched_long_enough() -> None:
    detector = StallDetector(CLOCK)
    for index in range(10):
        Run(detector, "etl", f"exec_{index}").moving(0.0, 600.0, every=10.0, gap=5.0)
    assert detector.threshold("etl", now=600.0) == stalls.COLD_S  # early stretches are the short ones
    assert detector.threshold("etl", now=600.0 + stalls.COLD_S) == stalls.FLOOR_S


def test_auto_waits_for_a_runs_own_pace_and_scales_with_it() -> None:
    detector = StallDetector(CLOCK)
    for index in range(10):
        Run(detector, "etl", f"exec_{index}").moving(0.0, 2500.0, every=10.0, gap=5.0)
    slow = Run(detector, "etl", "exec_slow")
    slow.poll(2500.0, answer(10, 2490.0))
    assert detector.limit(slow.state, 2500.0) == stalls.COLD_S  # no stretch of its own seen yet
    slow.poll(2600.0, answer(10, 2490.0))
    slow.poll(2700.0, answer(20, 2690.0))  # a stretch of at least 110 s
    assert detector.limit(slow.state, 2700.0) == stalls.FLOOR_S
    slow.poll(3200.0, answer(20, 2690.0))
    slow.poll(3300.0, answer(30, 3250.0))  # and one of at least 510 s
    assert detector.limit(slow.state, 3300.0) == pytest.approx(stalls.OWN_FACTOR * 510.0)
    assert not slow.events


def test_a_queued_run_is_not_stalled_until_it_waited_far_longer_than_its_kind_queues() -> None:
    detector = StallDetector(CLOCK, stall_after_s=300.0)
    run = Run(detector)
    for now in range(0, 1800, 60):
        assert run.poll(float(now), answer(0, 0.0, step="Queued")) is None  # 30 min in the queue
    assert run.state.queued
    assert detector.limit(run.state, 1800.0) == max(stalls.COLD_QUEUE_S, 3 * 300.0)
    assert run.poll(1900.0, answer(3, 1890.0, step="Starting")) is None  # it started: not queued now
    assert not run.state.queued
    stalled = run.poll(2200.0, answer(3, 1890.0, step="Starting"))
    assert stalled is not None  # a running freeze counts from the fixed 300 s
    assert stalled.last_change_at == WALL0 + 1890.0


def test_a_run_seen_first_at_progress_0_is_queued_until_it_moves() -> None:
    detector = StallDetector(CLOCK, stall_after_s=300.0)
    run = Run(detector)
    assert run.poll(0.0, answer(0, 0.0, step="Starting")) is None
    assert run.state.queued  # progress 0 and never changed: it may be waiting still
    assert run.poll(1000.0, answer(0, 0.0, step="Starting")) is None
    run.poll(1010.0, answer(1, 1005.0, step="Starting"))
    assert not run.state.queued


def test_stall_state_survives_a_restart_and_the_freeze_is_not_reported_twice() -> None:
    detector = StallDetector(CLOCK, stall_after_s=60.0)
    run = Run(detector)
    run.poll(0.0, answer(10, 0.0))
    first = run.poll(100.0, answer(10, 0.0))
    assert first is not None
    saved = export_state(run.state, CLOCK)
    assert saved["stall"]["since"] == WALL0 + 0.0
    restored = ExecState("exec_a", 0.0)
    restore_state(restored, saved, CLOCK)
    again = Run(StallDetector(CLOCK, stall_after_s=60.0))
    again.state = restored
    assert again.poll(200.0, answer(10, 0.0)) is None  # the same freeze: reported before the restart
    resumed = again.poll(300.0, answer(11, 290.0))
    assert resumed is not None
    assert resumed.kind is StallKind.RESUMED
    assert build_stall_record(resumed)["last_change_at"] == build_stall_record(first)["last_change_at"]
    assert export_state(again.state, CLOCK)["stall"]["since"] is None


def test_a_lost_stall_state_names_the_freeze_the_same_so_the_outbox_drops_it() -> None:
    detector = StallDetector(CLOCK, stall_after_s=60.0)
    run, fresh = Run(detector), Run(StallDetector(CLOCK, stall_after_s=60.0))
    run.poll(0.0, answer(10, 0.0))
    first = run.poll(100.0, answer(10, 0.0))
    second = fresh.poll(150.0, answer(10, 0.0))  # a restart that lost the bookkeeping
    assert first is not None
    assert second is not None
    with Store.open(None) as store:
        assert store.enqueue_event(build_stall_record(first), ["jsonl"]) == 1
        assert store.enqueue_event(build_stall_record(second), ["jsonl"]) == 0  # same event_id
        assert store.pending_count("jsonl") == 1


def test_the_store_lists_stalled_executions() -> None:
    detector = StallDetector(CLOCK, stall_after_s=60.0)
    run = Run(detector)
    run.poll(0.0, answer(10, 0.0))
    run.poll(100.0, answer(10, 0.0))
    with Store.open(None) as store:
        store.track_many([TrackRequest("exec_a", WALL0), TrackRequest("exec_b", WALL0)])
        store.save_poll("exec_a", export_state(run.state, CLOCK), None, 2)
        store.save_poll("exec_b", export_state(ExecState("exec_b", 0.0), CLOCK), None, 2)
        assert [r.execution_id for r in store.list_executions("stalled")] == ["exec_a"]
        assert store.count_executions("stalled") == 1


def test_stall_after_is_auto_by_default_or_a_duration() -> None:
    assert load_config(None).polling.stall_after is None
    assert load_config(None, overrides={"polling.stall_after": "auto"}).polling.stall_after is None
    assert load_config(None, overrides={"polling.stall_after": "3s"}).polling.stall_after == 3.0
    assert load_config(None, overrides={"polling.stall_after": "30m"}).polling.stall_after == 1800.0
    for bad in ("0", "soon", "-5m"):
        with pytest.raises(ConfigError, match=r"polling\.stall_after"):
            load_config(None, overrides={"polling.stall_after": bad})
    sink = load_config(None, overrides={"sinks": [{"type": "stdout", "events": ["stalled", "resumed"]}]}).sinks[0]
    assert sink.events == (SinkEvents.STALLED, SinkEvents.RESUMED)


def test_the_adaptive_policy_polls_a_stalled_run_more_often_and_checks_at_the_crossing() -> None:
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: 0.01)  # 100 s per request: a long round robin
    states = [ExecState(f"exec_{i}", 0.0) for i in range(3)]
    for state in states:
        policy.add(state, 0.0)
        state.last_poll = 0.0
        policy.polled(state, 0.0)
    plain = policy._period(states[0])
    states[1].stall_key = states[1].freeze = "2025-11-11T10:00:00Z"
    assert policy._period(states[1]) == pytest.approx(plain / STALLED_BOOST)
    states[2].check_at = 40.0  # it would cross its stall threshold at 40
    policy.polled(states[2], 0.0)
    assert policy.ready_at(1.0) <= 40.0
    assert policy.choose(40.0) is states[2]

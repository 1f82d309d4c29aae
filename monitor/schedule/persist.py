"""Per-execution schedule state as JSON-able dicts (epoch times), so a restarted process resumes.

The lead persists `export_state(...)` after every poll and hands it back as `track(restored=...)`.
Unknown or malformed fields are ignored: a state written by another version never stops a restart.
"""

from __future__ import annotations

import math
from typing import Any

from monitor.clock import Clock
from monitor.schedule.state import ExecState

STATE_VERSION = 1


def export_state(state: ExecState, clock: Clock) -> dict[str, Any]:
    deadline_s = None if state.expires_at is None else state.expires_at - state.tracked_since
    return {
        "v": STATE_VERSION,
        "tracked_since": clock.wall(state.tracked_since),
        "deadline_s": deadline_s,
        "polls": state.polls,
        "errors": state.errors,
        "not_found": {
            "count": state.nf_count,
            "first": clock.wall(state.nf_first) if state.nf_count else None,
        },
        "last_poll": clock.wall(state.last_poll),
        "progress": state.progress,
        "status": state.raw_status,
        "samples": [[clock.wall(t), p] for t, p in state.sample_pairs()],
        "delay": state.delay,
        "misses": state.misses,
        "zero_at": clock.wall(state.zero_at) if math.isfinite(state.zero_at) else None,
        "stall": _export_stall(state, clock),
    }


def _export_stall(state: ExecState, clock: Clock) -> dict[str, Any] | None:
    """The current stretch and the freeze reported stalled (`since`: null unless stalled now)."""
    if state.seen is None:
        return None
    stalled = state.stall_key is not None and state.stall_key == state.freeze
    return {
        "seen": state.seen,
        "changed_at": clock.wall(state.changed_at),
        "freeze": state.freeze,
        "queued": state.queued,
        "longest": state.longest,
        "reported": state.stall_key,
        "reported_since": clock.wall(state.stall_since) if state.stall_key is not None else None,
        "since": clock.wall(state.stall_since) if stalled else None,
    }


def restore_state(state: ExecState, data: dict[str, Any], clock: Clock) -> None:
    """Fill a fresh state from `export_state` output (times converted back to this loop)."""
    state.tracked_since = _loop_time(data.get("tracked_since"), clock, state.tracked_since)
    state.last_poll = _loop_time(data.get("last_poll"), clock, state.tracked_since)
    state.polls = _count(data.get("polls"))
    state.errors = _count(data.get("errors"))
    state.misses = _count(data.get("misses"))
    if _number(data.get("zero_at")) is not None:
        state.zero_at = _loop_time(data.get("zero_at"), clock, state.zero_at)
    delay = _number(data.get("delay"))
    if delay is not None and delay > 0:
        state.delay = delay
    deadline_s = _number(data.get("deadline_s"))
    if deadline_s is not None and deadline_s > 0:
        state.expires_at = state.tracked_since + deadline_s
    not_found = data.get("not_found")
    if isinstance(not_found, dict) and _count(not_found.get("count")) > 0:
        state.nf_count = _count(not_found.get("count"))
        state.nf_first = _loop_time(not_found.get("first"), clock, state.last_poll)
    progress = _number(data.get("progress"))
    state.progress = None if progress is None else int(progress)
    status = data.get("status")
    state.raw_status = status if isinstance(status, str) else None
    stall = data.get("stall")
    if isinstance(stall, dict):
        _restore_stall(state, stall, clock)
    samples = data.get("samples")
    if isinstance(samples, list):
        for item in samples:
            if isinstance(item, list | tuple) and len(item) == 2:
                t, p = _number(item[0]), _number(item[1])
                if t is not None and p is not None:
                    state.add_sample(clock.to_loop(t), p)


def _restore_stall(state: ExecState, data: dict[str, Any], clock: Clock) -> None:
    seen, freeze = data.get("seen"), data.get("freeze")
    if not (isinstance(seen, str) and isinstance(freeze, str)):
        return  # the next answer starts a stretch afresh (a freeze keeps its name: no second report)
    state.seen = seen
    state.changed_at = _loop_time(data.get("changed_at"), clock, state.last_poll)
    state.freeze = freeze
    state.queued = data.get("queued") is True
    longest = _number(data.get("longest"))
    state.longest = -1.0 if longest is None else longest
    reported = data.get("reported")
    if isinstance(reported, str):
        state.stall_key = reported
        state.stall_since = _loop_time(data.get("reported_since"), clock, state.changed_at)


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _count(value: object) -> int:
    number = _number(value)
    return int(number) if number is not None and number >= 0 else 0


def _loop_time(value: object, clock: Clock, default: float) -> float:
    number = _number(value)
    return default if number is None else clock.to_loop(number)

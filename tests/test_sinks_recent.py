"""Bounded duplicate checks: the recent-event_id window, and the stdout sink that uses it."""

from __future__ import annotations

import io
import json

import pytest

from monitor.config import SinkConfig
from monitor.sinks.recent import RECENT_EVENT_IDS, RecentIds
from monitor.sinks.stdout import StdoutSink


def test_the_oldest_event_id_goes_first_and_numbers_are_kept() -> None:
    recent = RecentIds(capacity=3)
    for number, event_id in enumerate(["a", "b", "c", "d"], start=1):
        recent.add(event_id, number)
    assert len(recent) == 3
    assert "a" not in recent
    assert (recent.get("a"), recent.get("b"), recent.get("d")) == (None, 2, 4)
    recent.add("b", 5)  # added again: now the newest
    recent.add("e", 6)
    assert [i for i in "abcde" if i in recent] == ["b", "d", "e"]


async def test_the_stdout_sink_remembers_only_the_recent_event_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    sink = StdoutSink.from_options({}, SinkConfig(type="stdout", index=1, source="test"))
    for n in range(RECENT_EVENT_IDS + 1):
        await sink.send({"event_id": f"ev_{n}", "kind": "execution"})
    await sink.send({"event_id": f"ev_{RECENT_EVENT_IDS}", "kind": "execution"})  # recent: no second line
    await sink.send({"event_id": "ev_0", "kind": "execution"})  # forgotten: the set does not grow forever
    written = [json.loads(line)["event_id"] for line in out.getvalue().splitlines()]
    assert len(written) == RECENT_EVENT_IDS + 2
    assert written[-1] == "ev_0"

"""The notify sink through real Apprise to a real receiver: Apprise's `json://` URL to an aiohttp
server on loopback. Message texts per record kind, throttling on a shortened minute, failures, and
the outbox's at-least-once delivery through the real delivery engine and store."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from monitor.clock import Clock
from monitor.config import ConfigError, SinkConfig
from monitor.delivery import Delivery
from monitor.errors import UsageError
from monitor.records import Outcome, TerminalEvent
from monitor.sinks.base import DeliveryError
from monitor.sinks.notify import NotifySink
from monitor.sinks.registry import build_sinks
from monitor.state.store import Store, TrackRequest

WINDOW_S = 1.0  # the throttle's "minute" in these tests


@dataclass
class Message:
    at: float  # loop time it arrived
    status: int  # what the receiver answered
    payload: dict[str, Any]

    @property
    def text(self) -> str:
        return str(self.payload["message"])


@dataclass
class Receiver:
    """Apprise's JSON notifications as they arrive; `plan(n)` is the status for the n-th (1-based)."""

    plan: Callable[[int], int] = lambda n: 200
    messages: list[Message] = field(default_factory=list)
    url: str = ""  # the Apprise URL for it

    async def handle(self, request: web.Request) -> web.Response:
        status = self.plan(len(self.messages) + 1)
        payload = json.loads(await request.read())
        self.messages.append(Message(asyncio.get_running_loop().time(), status, payload))
        return web.Response(status=status)

    def delivered(self) -> list[str]:
        return [m.text for m in self.messages if m.status == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rcv = Receiver()
    app = web.Application()
    app.router.add_post("/notify/{token}", rcv.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rcv.url = f"json://127.0.0.1:{port}/notify/s3cr3t-t0ken"
    yield rcv
    await runner.cleanup()


def notify_config(options: dict[str, Any], **common: Any) -> SinkConfig:
    return SinkConfig(type="notify", index=2, source="test.toml", options=options, **common)


def execution(n: int, outcome: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"event_id": f"ev_{n}", "kind": "execution", "execution_id": f"exec_{n:03d}", "outcome": outcome, **extra}


async def test_each_kind_of_record_is_one_readable_message(receiver: Receiver) -> None:
    sink = NotifySink([receiver.url], title="execmon", max_per_minute=20)
    records = [
        execution(
            1,
            "failed",
            group="nightly",
            metadata={"execution_time": 723.4},
            error={"code": "execution_error", "message": "Task execution failed", "details": "OOM\nin step 3"},
        ),
        execution(2, metadata={"execution_time": 45}),
        execution(3, "timed_out"),
        {
            "event_id": "evg_1",
            "kind": "group",
            "group": "nightly",
            "total": 300,
            "outcomes": {"completed": 291, "failed": 7, "cancelled": 2},
            "failed_ids": [f"exec_{n}" for n in range(9)],
        },
        {
            "event_id": "evs_1",
            "kind": "stalled",
            "execution_id": "exec_123",
            "progress": 40,
            "current_step": "embedding",
            "stalled_for_s": 1800.0,
            "group": None,
        },
        {"event_id": "evr_1", "kind": "resumed", "execution_id": "exec_123", "progress": 45, "stalled_for_s": 1920},
        {"event_id": "evx_1", "kind": "quota_warning", "execution_id": "exec_9"},
    ]
    await sink.open()
    try:
        for record in records:
            await sink.send(record)
    finally:
        await sink.close()
    got = [(m.payload["type"], m.text) for m in receiver.messages]
    assert got == [
        ("failure", "exec_001 failed after 12m 3s (group nightly): Task execution failed: OOM in step 3"),
        ("success", "exec_002 completed after 45s"),
        ("failure", "exec_003 timed out: still running at its deadline"),
        (
            "warning",
            "nightly: 291 completed, 9 did not (7 failed, 2 cancelled) — did not complete: "
            "exec_0, exec_1, exec_2, exec_3, exec_4, … (+4)",
        ),
        ("warning", "exec_123 stalled at 40% (step embedding) for 30m"),
        ("info", "exec_123 resumed at 45% after 32m stalled"),
        ("info", "execmon: a 'quota_warning' record for exec_9 (event evx_1)"),
    ]
    assert {m.payload["title"] for m in receiver.messages} == {"execmon"}


async def test_past_max_per_minute_the_rest_of_the_minute_is_one_summary(receiver: Receiver) -> None:
    sink = NotifySink([receiver.url], max_per_minute=3, window_s=WINDOW_S)
    returned: dict[str, float] = {}

    async def send(record: dict[str, Any]) -> None:
        await sink.send(record)
        returned[record["execution_id"]] = asyncio.get_running_loop().time()

    burst = [execution(n, "failed" if n in (4, 9) else "completed") for n in range(10)]
    await sink.open()
    try:
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(send(r) for r in burst))
        assert len(receiver.messages) == 4
        await asyncio.sleep(WINDOW_S * 1.2)  # the minute after: a slot is free again
        await send(execution(10))
    finally:
        await sink.close()
    texts = [m.text for m in receiver.messages]  # the first three were sent at once: in any order
    assert sorted(texts[:3]) == ["exec_000 completed", "exec_001 completed", "exec_002 completed"]
    assert texts[3] == "and 7 more: 5 completed, 2 failed — failed: exec_004, exec_009"
    assert receiver.messages[3].payload["type"] == "failure"
    assert texts[4:] == ["exec_010 completed"]
    summary_at = receiver.messages[3].at
    assert summary_at - start >= WINDOW_S * 0.99  # sent when the minute ended, not before
    folded = [f"exec_{n:03d}" for n in range(3, 10)]
    assert all(returned[i] >= summary_at for i in folded)  # nobody returned before the summary was sent


async def test_the_limit_holds_in_every_sliding_minute(receiver: Receiver) -> None:
    sink = NotifySink([receiver.url], max_per_minute=2, window_s=WINDOW_S)
    sends: list[asyncio.Task[None]] = []
    await sink.open()
    try:
        for n in range(12):  # a steady trickle, faster than the limit
            sends.append(asyncio.create_task(sink.send(execution(n))))
            await asyncio.sleep(WINDOW_S / 5)
        await asyncio.gather(*sends)
    finally:
        await sink.close()
    times = [m.at for m in receiver.messages]
    assert all(later - earlier >= WINDOW_S * 0.9 for earlier, later in zip(times, times[2:], strict=False))
    represented = 0
    for text in receiver.delivered():
        more = re.match(r"and (\d+) more", text)
        represented += int(more.group(1)) if more else 1
    assert represented == 12  # every record stood for once, none lost, none twice


async def test_a_failing_receiver_is_a_retryable_delivery_error(receiver: Receiver) -> None:
    receiver.plan = lambda n: 500
    sink = NotifySink([receiver.url])
    await sink.open()
    try:
        with pytest.raises(DeliveryError) as caught:
            await sink.send(execution(1))
    finally:
        await sink.close()
    assert caught.value.retryable is True
    assert "json://" in caught.value.reason
    assert "s3cr3t" not in caught.value.reason


async def test_a_failed_summary_fails_every_folded_record(receiver: Receiver) -> None:
    receiver.plan = lambda n: 500 if n == 3 else 200  # the summary
    sink = NotifySink([receiver.url], max_per_minute=2, window_s=WINDOW_S)
    await sink.open()
    try:
        outcomes = await asyncio.gather(*(sink.send(execution(n)) for n in range(6)), return_exceptions=True)
    finally:
        await sink.close()
    assert outcomes[:2] == [None, None]
    assert all(isinstance(o, DeliveryError) and o.retryable for o in outcomes[2:]), outcomes
    assert [m.status for m in receiver.messages] == [200, 200, 500]


async def test_through_the_outbox_every_folded_record_is_delivered_only_with_its_summary(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(NotifySink, "WINDOW_S", WINDOW_S)
    receiver.plan = lambda n: 500 if n == 4 else 200  # the first summary fails: its 7 records are retried
    config = notify_config(
        {"urls": [receiver.url], "max_per_minute": 3}, backoff_base_s=0.01, backoff_cap_s=0.05, pause_after_failures=0
    )
    handles = build_sinks([config])
    assert handles[0].config.timeout_s == config.timeout_s + WINDOW_S + 1.0  # room to wait for a summary
    assert handles[0].concurrency > 10  # a summary holds a worker per folded record
    events = [
        TerminalEvent(f"exec_{n:03d}", Outcome.COMPLETED, observed_at=2.0, tracked_since=1.0, polls=1)
        for n in range(10)
    ]
    with Store.open(tmp_path / "s.db") as store:
        store.track_many(TrackRequest(e.execution_id, tracked_since=1.0) for e in events)
        async with Delivery(store, handles, Clock()) as delivery:
            for e in events:
                delivery.submit(e)
            assert await delivery.drain(timeout=20)
            counters = delivery.counters()["notify"]
        assert store.dead_count() == 0
    assert counters.delivered == 10
    assert counters.failed == 7  # the records of the failed summary, once each
    represented = 0
    for text in receiver.delivered():
        more = re.match(r"and (\d+) more: (\d+) completed$", text)
        represented += int(more.group(1)) if more else 1
    assert represented == 10


def test_config_is_checked_at_start_and_never_shows_an_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "key 'urls': expected a list of Apprise URLs"),
        ({"urls": "json://localhost/x"}, "key 'urls': expected a list of Apprise URLs"),
        ({"urls": []}, "key 'urls': expected a list of Apprise URLs"),
        ({"urls": ["json://localhost/x", "nosuch://hunter2-secret@x"]}, "item 2 (a nosuch:// URL)"),
        ({"urls": ["slack://hunter2-secret"]}, "item 1 (a slack:// URL) is not one Apprise can use"),
        ({"urls": ["json://localhost/x"], "max_per_minute": 0}, "key 'max_per_minute': expected an integer >= 1"),
        ({"urls": ["json://localhost/x"], "colour": "red"}, "unknown key 'colour' for a notify sink"),
    ]
    for options, expected in cases:
        with pytest.raises(ConfigError) as caught:
            NotifySink.from_options(options, notify_config(options))
        assert "test.toml: [[sinks]] #2" in str(caught.value)
        assert expected in str(caught.value)
        assert "hunter2" not in str(caught.value)
    assert "hunter2" not in caplog.text  # Apprise logs what it cannot parse: not while we ask it


async def test_the_sink_type_is_registered_as_notify_and_takes_urls_from_the_environment(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXECMON_TEST_NOTIFY_URL", receiver.url)
    handles = build_sinks([notify_config({"url_envs": ["EXECMON_TEST_NOTIFY_URL"], "title": "CI"})])
    sink = handles[0].sink
    assert isinstance(sink, NotifySink)
    assert handles[0].name == "notify"
    assert "s3cr3t" not in repr(sink)
    await sink.open()
    try:
        await sink.send(execution(7, "cancelled", group="g1"))
    finally:
        await sink.close()
    assert [(m.payload["title"], m.text) for m in receiver.messages] == [("CI", "exec_007 was cancelled (group g1)")]
    monkeypatch.delenv("EXECMON_TEST_NOTIFY_URL")
    with pytest.raises(UsageError, match=r"key 'url_envs': environment variable EXECMON_TEST_NOTIFY_URL is not set"):
        build_sinks([notify_config({"url_envs": ["EXECMON_TEST_NOTIFY_URL"]})])

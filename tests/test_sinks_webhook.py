"""The webhook sink against a real aiohttp receiver on loopback: retries, signatures, idempotency keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from monitor.clock import Clock
from monitor.config import SinkConfig
from monitor.delivery import Delivery
from monitor.errors import UsageError
from monitor.records import Outcome, TerminalEvent
from monitor.sinks.base import DeliveryError
from monitor.sinks.registry import build_sinks
from monitor.sinks.webhook import WebhookSink
from monitor.state.store import Store, TrackRequest

SECRET = "hook-secret-for-tests"
WHSEC = "whsec_" + base64.b64encode(b"rotated-key-bytes-0123456789abcd").decode()


def verifies(secret: str | bytes, body: bytes, headers: dict[str, str]) -> bool:
    """Does the `standardwebhooks` package (not our code) accept this post with this secret?"""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


@dataclass
class Receiver:
    """A webhook receiver written from the contract: answers `plan(n)` for the n-th post (1-based)."""

    plan: Callable[[int], tuple[int, dict[str, str]]] = lambda n: (200, {})
    posts: int = 0
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeats: int = 0
    bad_signatures: int = 0
    bad_standard_signatures: int = 0  # checked with the standardwebhooks package, plain secret as bytes
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        self.times.append(asyncio.get_running_loop().time())
        body = await request.read()
        good = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Execmon-Signature", ""), good):
            self.bad_signatures += 1
        headers = dict(request.headers)
        self.seen.append((headers, body))
        if not verifies(SECRET.encode(), body, headers):
            self.bad_standard_signatures += 1
        status, headers = self.plan(self.posts)
        if status == 0:
            await asyncio.sleep(3600)  # hang
        if status == 200:
            key = request.headers["Idempotency-Key"]
            if key in self.accepted:
                self.repeats += 1  # a receiver drops repeats by key
            else:
                self.accepted[key] = json.loads(body)
        return web.Response(status=status, headers=headers, text="" if status == 200 else "nope\nnope")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rcv = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{token}", rcv.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rcv.url = f"http://127.0.0.1:{port}/hook/t0k3n-in-path"
    yield rcv
    await runner.cleanup()


def hook_config(url: str, index: int = 1, **common: Any) -> SinkConfig:
    return SinkConfig(
        type="webhook",
        index=index,
        source="test.toml",
        options={"url": url, "secret_env": "EXECMON_TEST_HOOK_SECRET"},
        **common,
    )


def event(n: int, outcome: Outcome = Outcome.COMPLETED) -> TerminalEvent:
    return TerminalEvent(f"exec_{n:03d}", outcome, observed_at=2000.0, tracked_since=1000.0, polls=n)


@pytest.fixture(autouse=True)
def hook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECMON_TEST_HOOK_SECRET", SECRET)


async def test_every_result_arrives_signed_once_per_key_through_500s(receiver: Receiver, tmp_path: Path) -> None:
    receiver.plan = lambda n: (500, {}) if n <= 7 else (200, {})
    sinks = build_sinks(
        [hook_config(receiver.url, max_attempts=10, backoff_base_s=0.01, backoff_cap_s=0.05, on=(Outcome.FAILED,))]
    )
    with Store.open(tmp_path / "s.db") as store:
        events = [event(n, Outcome.FAILED if n % 2 else Outcome.COMPLETED) for n in range(12)]
        store.track_many(TrackRequest(e.execution_id, tracked_since=1000.0) for e in events)
        async with Delivery(store, sinks, Clock()) as delivery:
            for e in events:
                delivery.submit(e)
            assert await delivery.drain(timeout=20)
            assert delivery.counters()["webhook"].failed == 7
        assert store.dead_count() == 0
    failed_ids = {e.execution_id for e in events if e.outcome is Outcome.FAILED}
    assert {r["execution_id"] for r in receiver.accepted.values()} == failed_ids  # only `on` outcomes
    assert all(key == r["event_id"] for key, r in receiver.accepted.items())
    assert receiver.bad_signatures == 0
    assert receiver.bad_standard_signatures == 0
    assert receiver.repeats == 0
    assert receiver.posts == 7 + len(failed_ids)
    stamps = [int(headers["webhook-timestamp"]) for headers, _ in receiver.seen]
    assert all(abs(stamp - time.time()) < 60 for stamp in stamps)  # each attempt's own time


async def test_client_errors_are_permanent_with_the_status_in_the_reason(receiver: Receiver) -> None:
    receiver.plan = lambda n: (404, {})
    sink = WebhookSink.from_options(hook_config(receiver.url).options, hook_config(receiver.url))
    await sink.open()
    try:
        with pytest.raises(DeliveryError) as caught:
            await sink.send({"event_id": "ev_1", "kind": "execution"})
    finally:
        await sink.close()
    assert caught.value.retryable is False
    assert "HTTP 404" in caught.value.reason
    assert "nope nope" in caught.value.reason
    assert "t0k3n" not in caught.value.reason  # the URL's path may be a secret


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_retryable_statuses_carry_retry_after(receiver: Receiver, status: int) -> None:
    receiver.plan = lambda n: (status, {"Retry-After": "7"})
    sink = WebhookSink.from_options(hook_config(receiver.url).options, hook_config(receiver.url))
    await sink.open()
    try:
        with pytest.raises(DeliveryError) as caught:
            await sink.send({"event_id": "ev_1", "kind": "execution"})
    finally:
        await sink.close()
    assert caught.value.retryable is True
    assert caught.value.retry_after_s == 7.0
    assert f"HTTP {status}" in caught.value.reason


async def test_retry_after_is_honoured_by_the_engine(receiver: Receiver, tmp_path: Path) -> None:
    receiver.plan = lambda n: (429, {"Retry-After": "1"}) if n == 1 else (200, {})
    sinks = build_sinks([hook_config(receiver.url, backoff_base_s=0.01, backoff_cap_s=5.0)])
    with Store.open(tmp_path / "s.db") as store:
        store.track_many([TrackRequest("exec_000", tracked_since=1.0)])
        async with Delivery(store, sinks, Clock()) as delivery:
            delivery.submit(event(0))
            assert await delivery.drain(timeout=10)
    assert receiver.posts == 2
    assert receiver.times[1] - receiver.times[0] >= 0.95


async def test_connection_refused_is_retryable(receiver: Receiver) -> None:
    cfg = hook_config("http://127.0.0.1:9/hook")  # port 9 (discard): nothing listens
    sink = WebhookSink.from_options(cfg.options, cfg)
    await sink.open()
    try:
        with pytest.raises(DeliveryError) as caught:
            await sink.send({"event_id": "ev_1"})
    finally:
        await sink.close()
    assert caught.value.retryable is True
    assert "127.0.0.1:9" in caught.value.reason


async def test_a_hanging_receiver_attempt_ends_by_timeout(receiver: Receiver, tmp_path: Path) -> None:
    receiver.plan = lambda n: (0, {}) if n <= 2 else (200, {})
    sinks = build_sinks([hook_config(receiver.url, timeout_s=0.3, backoff_base_s=0.01, backoff_cap_s=0.02)])
    with Store.open(tmp_path / "s.db") as store:
        store.track_many([TrackRequest(f"exec_{n:03d}", tracked_since=1.0) for n in range(3)])
        async with Delivery(store, sinks, Clock()) as delivery:
            for n in range(3):
                delivery.submit(event(n))
            assert await delivery.drain(timeout=10)
    assert len(receiver.accepted) == 3


def test_bad_configuration_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = hook_config("ftp://example.com/secret-path")
    with pytest.raises(UsageError, match=r"#1 key 'url': expected an http:// or https:// URL") as caught:
        WebhookSink.from_options(cfg.options, cfg)
    assert "secret-path" not in str(caught.value)
    monkeypatch.delenv("EXECMON_TEST_HOOK_SECRET")
    cfg = hook_config("https://example.com/hook")
    with pytest.raises(UsageError, match="environment variable EXECMON_TEST_HOOK_SECRET is not set"):
        WebhookSink.from_options(cfg.options, cfg)
    with pytest.raises(UsageError, match="key 'headers'"):
        WebhookSink.from_options({"url": "https://example.com/h", "headers": {"Idempotency-Key": "x"}}, cfg)
    with pytest.raises(UsageError, match="key 'headers'"):
        WebhookSink.from_options({"url": "https://example.com/h", "headers": {"X-A": "a\r\nInjected: 1"}}, cfg)


def test_unsigned_when_no_secret_and_custom_headers_sent() -> None:
    cfg = SinkConfig(type="webhook", index=1, source="t", options={})
    sink = WebhookSink.from_options({"url": "https://example.com/h", "headers": {"X-Team": "ops"}}, cfg)
    headers = sink.headers_for({"event_id": "ev_9"}, b"{}")
    assert headers == {"X-Team": "ops", "Content-Type": "application/json", "Idempotency-Key": "ev_9"}
    assert "example.com" in repr(sink)


async def test_standard_webhooks_signatures_with_rotation_verify_with_the_package(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXECMON_TEST_HOOK_SECRET_NEW", WHSEC)
    cfg = hook_config(receiver.url)
    sink = WebhookSink.from_options({**cfg.options, "secret_envs": ["EXECMON_TEST_HOOK_SECRET_NEW"]}, cfg)
    record = {"event_id": "ev_rot1", "kind": "execution", "outcome": "failed", "note": "caf\u00e9"}
    await sink.open()
    try:
        await sink.send(record)
    finally:
        await sink.close()
    [(headers, body)] = receiver.seen
    assert headers["webhook-id"] == "ev_rot1" == headers["Idempotency-Key"]
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert [part[:3] for part in headers["webhook-signature"].split(" ")] == ["v1,", "v1,"]  # one per secret
    # A receiver that knows either secret accepts it (mid-rotation); another secret or body does not.
    assert Webhook(WHSEC).verify(body, headers) == record
    assert verifies(SECRET.encode(), body, headers)  # a plain secret is its UTF-8 bytes
    assert not verifies("whsec_" + base64.b64encode(b"some-other-key-bytes-0123456789").decode(), body, headers)
    assert not verifies(WHSEC, body.replace(b"failed", b"passed"), headers)
    assert receiver.bad_signatures == 0  # X-Execmon-Signature: the first secret, as before


def test_signing_secrets_are_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = hook_config("https://example.com/hook")
    monkeypatch.setenv("EXECMON_TEST_BAD_WHSEC", "whsec_not*base64!")
    with pytest.raises(UsageError, match="must be base64 after the prefix") as caught:
        WebhookSink.from_options({**cfg.options, "secret_envs": ["EXECMON_TEST_BAD_WHSEC"]}, cfg)
    assert "not*base64" not in str(caught.value)
    with pytest.raises(UsageError, match="key 'secret_envs': expected a list of environment variable names"):
        WebhookSink.from_options({**cfg.options, "secret_envs": "EXECMON_TEST_HOOK_SECRET"}, cfg)
    with pytest.raises(UsageError, match="key 'secret_envs': environment variable EXECMON_TEST_UNSET_9 is not set"):
        WebhookSink.from_options({**cfg.options, "secret_envs": ["EXECMON_TEST_UNSET_9"]}, cfg)
    sink = WebhookSink.from_options({**cfg.options, "secret_envs": ["EXECMON_TEST_HOOK_SECRET"]}, cfg)
    signature = sink.headers_for({"event_id": "ev_1"}, b"{}")["webhook-signature"]
    assert len(signature.split(" ")) == 1  # the same variable twice signs once
    assert SECRET not in repr(sink)

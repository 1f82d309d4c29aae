"""ExecutionsClient against a real aiohttp server on loopback whose answer per ID is scripted."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from monitor import KeyRejectedError, Monitor
from monitor.api.client import ExecutionsClient, check_base_url, parse_retry_after
from monitor.api.errors import (
    ApiError,
    ExecutionNotFound,
    KeyRejected,
    Throttled,
    TransientError,
    TransientReason,
)
from monitor.api.models import ExecutionStatus
from monitor.errors import UsageError
from monitor.ids import InvalidExecutionId
from monitor.logs import configure_logging, reset_logging
from monitor.secrets import Secret

KEY = "sk_test_client_key_0123456789"
TIMEOUT_S = 0.3
MIB = 1024 * 1024
NOW = datetime(2025, 11, 11, 10, 30, tzinfo=UTC)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return handler


def _raw(body: bytes, status: int = 200, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, content_type=content_type)

    return handler


def _error(code: str, status: int, headers: dict[str, str] | None = None) -> Handler:
    return _json({"error": {"code": code, "message": "scripted"}}, status, headers)


async def _slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(TIMEOUT_S * 4)
    return web.json_response({"status": "running"})


async def _cut_mid_answer(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = 1000
    await resp.prepare(request)
    await resp.write(b'{"execution_id": "exec_cut", "status": "run')
    assert request.transport is not None
    request.transport.close()
    return resp


async def _drop(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()  # closed before any status line
    return web.Response()


def _streamed(total: int, *, with_length: bool) -> tuple[Handler, list[int]]:
    """A 200 whose body is `total` bytes, sent in chunks; records how much was actually written."""
    written = [0]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if with_length:
            resp.content_length = total
        await resp.prepare(request)
        chunk = b" " * 65536
        try:
            while written[0] < total:
                await resp.write(chunk)
                written[0] += len(chunk)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass  # the client stopped reading: that is the point
        return resp

    return handler, written


def _date_429(delay_s: int) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        now = datetime.now(UTC).replace(microsecond=0)
        headers = {
            "Date": format_datetime(now, usegmt=True),
            "Retry-After": format_datetime(now + timedelta(seconds=delay_s), usegmt=True),
        }
        return web.json_response({"error": {"code": "rate_limited"}}, status=429, headers=headers)

    return handler


RUNNING = {
    "execution_id": "exec_running",
    "status": "running",
    "progress": 45,
    "current_step": "Analyzing data",
    "updated_at": "2025-11-11T10:30:15Z",
}
COMPLETED = {
    "execution_id": "exec_completed",
    "status": "completed",
    "progress": 100,
    "result": "Task completed successfully",
    "metadata": {"execution_time": 12.5, "tokens_used": 1250},
    "completed_at": "2025-11-11T10:30:30Z",
}
FAILED = {
    "execution_id": "exec_failed",
    "status": "failed",
    "error": {"code": "execution_error", "message": "Task execution failed", "details": "x"},
    "failed_at": "2025-11-11T10:30:25Z",
}
CANCELLED = {
    "execution_id": "exec_cancelled",
    "status": "cancelled",
    "progress": 30,
    "cancelled_at": "2025-11-11T10:31:00Z",
}


@dataclass
class Api:
    """The scripted server and what reached it."""

    url: str
    paths: list[str] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    script: dict[str, Handler] = field(default_factory=dict)
    big_written: list[int] = field(default_factory=list)


def _script(api: Api) -> dict[str, Handler]:
    big_chunked, written = _streamed(64 * MIB, with_length=False)
    api.big_written = written
    return {
        "exec_running": _json(RUNNING),
        "exec_completed": _json(COMPLETED),
        "exec_failed": _json(FAILED),
        "exec_cancelled": _json(CANCELLED),
        "exec_paused": _json({"execution_id": "exec_paused", "status": "paused", "progress": 10}),
        "exec_extra": _json({**RUNNING, "execution_id": "exec_extra", "eta_s": 12, "nested": {"a": [1]}}),
        "exec_minimal": _json({"status": "running"}),
        "exec_401": _error("unauthorized", 401),
        "exec_403": _error("forbidden", 403),
        "exec_403_too": _error("forbidden", 403),
        "exec_404": _error("not_found", 404),
        "exec_429_delta": _error("rate_limited", 429, {"Retry-After": "7"}),
        "exec_429_date": _date_429(12),
        "exec_429_none": _error("rate_limited", 429),
        "exec_429_garbage": _error("rate_limited", 429, {"Retry-After": "soon-ish"}),
        "exec_429_huge": _error("rate_limited", 429, {"Retry-After": "86400"}),
        "exec_500": _error("internal", 500),
        "exec_502": _raw(b"<html>bad gateway</html>", 502, "text/html"),
        "exec_503": _error("unavailable", 503),
        "exec_418": _error("teapot", 418),
        "exec_302": _json({}, 302, {"Location": "/elsewhere"}),
        "exec_slow": _slow,
        "exec_cut": _cut_mid_answer,
        "exec_drop": _drop,
        "exec_html": _raw(b"<html>maintenance</html>", 200, "text/html"),
        "exec_empty": _raw(b""),
        "exec_truncated": _raw(b'{"execution_id": "exec_truncated", "status": "runn'),
        "exec_binary": _raw(bytes(range(256))),
        "exec_nan": _raw(b'{"status": "running", "progress": NaN}'),
        "exec_inf": _raw(b'{"status": "running", "progress": 1e400}'),
        "exec_deep": _raw(b"[" * 200_000 + b"]" * 200_000),
        "exec_list": _json([1, 2, 3]),
        "exec_string": _json("running"),
        "exec_no_status": _json({"execution_id": "exec_no_status", "progress": 5}),
        "exec_status_int": _json({"status": 3}),
        "exec_other_id": _json({**RUNNING, "execution_id": "exec_someone_else"}),
        "exec_big_length": _raw(b" " * (2 * MIB) + b"{}"),
        "exec_big_chunked": big_chunked,
        "exec_at_cap": _raw(json.dumps({"status": "running", "pad": "x" * (MIB - 100)}).encode().ljust(MIB)),
    }


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    state = Api(url="")
    state.script = _script(state)

    async def catch_all(request: web.Request) -> web.StreamResponse:
        state.paths.append(request.raw_path)
        state.keys.append(request.headers.get("X-API-Key"))
        parts = request.raw_path.split("/")
        if len(parts) == 6 and parts[:4] == ["", "api", "v1", "executions"] and parts[5] == "status":
            handler = state.script.get(parts[4])
            if handler is not None:
                return await handler(request)
        return web.json_response({"error": {"code": "not_found"}}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", catch_all)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def client(api: Api) -> AsyncIterator[ExecutionsClient]:
    async with ExecutionsClient(api.url, Secret(KEY), timeout_s=TIMEOUT_S) as c:
        yield c


async def _transient(client: ExecutionsClient, execution_id: str) -> TransientError:
    with pytest.raises(TransientError) as info:
        await client.get_status(execution_id)
    return info.value


# --- 200 answers -----------------------------------------------------------------------------------


async def test_running_answer_is_parsed_and_the_key_is_sent(client: ExecutionsClient, api: Api) -> None:
    record = await client.get_status("exec_running")
    assert record.status is ExecutionStatus.RUNNING
    assert (record.progress, record.current_step, record.updated_at) == (
        45,
        "Analyzing data",
        "2025-11-11T10:30:15Z",
    )
    assert api.paths == ["/api/v1/executions/exec_running/status"]
    assert api.keys == [KEY]


@pytest.mark.parametrize(
    ("execution_id", "status", "finished_at"),
    [
        ("exec_completed", ExecutionStatus.COMPLETED, "2025-11-11T10:30:30Z"),
        ("exec_failed", ExecutionStatus.FAILED, "2025-11-11T10:30:25Z"),
        ("exec_cancelled", ExecutionStatus.CANCELLED, "2025-11-11T10:31:00Z"),
    ],
)
async def test_terminal_answers(
    client: ExecutionsClient, execution_id: str, status: ExecutionStatus, finished_at: str
) -> None:
    record = await client.get_status(execution_id)
    assert record.status is status
    assert record.status.terminal
    assert record.finished_at == finished_at


async def test_completed_and_failed_fields(client: ExecutionsClient) -> None:
    completed = await client.get_status("exec_completed")
    assert completed.result == "Task completed successfully"
    assert completed.metadata == {"execution_time": 12.5, "tokens_used": 1250}
    failed = await client.get_status("exec_failed")
    assert failed.error is not None
    assert failed.error["code"] == "execution_error"


async def test_unknown_status_value_is_not_terminal(client: ExecutionsClient) -> None:
    record = await client.get_status("exec_paused")
    assert record.status is ExecutionStatus.UNKNOWN
    assert record.raw_status == "paused"
    assert not record.status.terminal


async def test_extra_fields_are_kept_in_raw(client: ExecutionsClient) -> None:
    record = await client.get_status("exec_extra")
    assert record.raw["eta_s"] == 12
    assert record.raw["nested"] == {"a": [1]}


async def test_minimal_answer_leaves_missing_fields_none(client: ExecutionsClient) -> None:
    record = await client.get_status("exec_minimal")
    assert record.status is ExecutionStatus.RUNNING
    assert (record.progress, record.result, record.finished_at) == (None, None, None)


async def test_body_exactly_at_the_cap_is_accepted(client: ExecutionsClient) -> None:
    record = await client.get_status("exec_at_cap")
    assert record.status is ExecutionStatus.RUNNING


# --- error statuses --------------------------------------------------------------------------------


async def test_401_is_key_rejected(client: ExecutionsClient) -> None:
    with pytest.raises(KeyRejected) as info:
        await client.get_status("exec_401")
    assert (info.value.status, str(info.value)) == (401, "the API key was rejected: 401 unauthorized")


async def test_403_is_key_rejected_with_its_own_message(client: ExecutionsClient) -> None:
    with pytest.raises(KeyRejected) as info:
        await client.get_status("exec_403")
    assert (info.value.status, str(info.value)) == (403, "the API key was rejected: forbidden (403)")
    assert KEY not in str(info.value)


async def test_a_403_stops_a_monitor_like_a_401(api: Api) -> None:
    """Stop spending at once, report unhealthy with the reason, raise to the caller; never retry."""
    ids = ["exec_403", "exec_403_too", "exec_running"]
    async with Monitor(base_url=api.url, api_key=KEY, rate_limit="30/60s") as mon:
        await mon.track(ids)
        with pytest.raises(KeyRejectedError, match=r"forbidden \(403\)"):
            await mon.wait(ids, timeout=10)
        ok, reason = mon.health()
        assert not ok
        assert reason is not None
        assert "forbidden (403)" in reason
        asked = len(api.paths)
        await asyncio.sleep(1.5)  # a retried 403 would be asked again within this
        assert len(api.paths) == asked, api.paths
    assert 1 <= sum("/exec_403" in path for path in api.paths) <= 2, api.paths


async def test_404_is_not_found_with_the_id(client: ExecutionsClient) -> None:
    with pytest.raises(ExecutionNotFound) as info:
        await client.get_status("exec_404")
    assert info.value.execution_id == "exec_404"


@pytest.mark.parametrize(
    ("execution_id", "expected"),
    [("exec_429_delta", 7.0), ("exec_429_date", 12.0), ("exec_429_none", None), ("exec_429_garbage", None)],
)
async def test_429_is_throttled_with_retry_after(
    client: ExecutionsClient, execution_id: str, expected: float | None
) -> None:
    with pytest.raises(Throttled) as info:
        await client.get_status(execution_id)
    assert info.value.retry_after_s == expected


async def test_429_retry_after_is_capped(api: Api) -> None:
    async with ExecutionsClient(api.url, Secret(KEY), retry_after_cap_s=120.0) as c:
        with pytest.raises(Throttled) as info:
            await c.get_status("exec_429_huge")
    assert info.value.retry_after_s == 120.0


@pytest.mark.parametrize("execution_id", ["exec_500", "exec_502", "exec_503"])
async def test_5xx_is_a_server_error(client: ExecutionsClient, execution_id: str) -> None:
    error = await _transient(client, execution_id)
    assert error.reason is TransientReason.SERVER_ERROR
    assert execution_id[-3:] in str(error)


@pytest.mark.parametrize("execution_id", ["exec_418", "exec_302"])
async def test_other_statuses_are_unexpected(client: ExecutionsClient, api: Api, execution_id: str) -> None:
    error = await _transient(client, execution_id)
    assert error.reason is TransientReason.UNEXPECTED_STATUS
    assert "/elsewhere" not in api.paths  # a redirect is never followed (it could carry the key away)


# --- transport failures and bad bodies -------------------------------------------------------------


async def test_slow_answer_is_a_timeout(client: ExecutionsClient) -> None:
    started = asyncio.get_running_loop().time()
    error = await _transient(client, "exec_slow")
    assert error.reason is TransientReason.TIMEOUT
    assert asyncio.get_running_loop().time() - started < TIMEOUT_S * 3


@pytest.mark.parametrize("execution_id", ["exec_cut", "exec_drop"])
async def test_connection_closed_is_a_connection_error(client: ExecutionsClient, execution_id: str) -> None:
    error = await _transient(client, execution_id)
    assert error.reason is TransientReason.CONNECTION


@pytest.mark.parametrize(
    "execution_id",
    ["exec_html", "exec_empty", "exec_truncated", "exec_binary", "exec_nan", "exec_inf", "exec_deep"],
)
async def test_non_json_bodies(client: ExecutionsClient, execution_id: str) -> None:
    error = await _transient(client, execution_id)
    assert error.reason is TransientReason.NOT_JSON


@pytest.mark.parametrize(
    "execution_id", ["exec_list", "exec_string", "exec_no_status", "exec_status_int", "exec_other_id"]
)
async def test_json_of_the_wrong_shape(client: ExecutionsClient, execution_id: str) -> None:
    error = await _transient(client, execution_id)
    assert error.reason is TransientReason.BAD_SHAPE


async def test_body_over_the_cap_with_a_length_is_refused(client: ExecutionsClient) -> None:
    error = await _transient(client, "exec_big_length")
    assert error.reason is TransientReason.TOO_LARGE


async def test_chunked_body_over_the_cap_is_not_read_whole(client: ExecutionsClient, api: Api) -> None:
    error = await _transient(client, "exec_big_chunked")
    assert error.reason is TransientReason.TOO_LARGE
    await asyncio.sleep(0.2)  # let the server notice the closed connection
    assert api.big_written[0] < 32 * MIB  # the server was cut off long before its 64 MiB


async def test_client_keeps_working_after_every_kind_of_failure(client: ExecutionsClient, api: Api) -> None:
    for execution_id in api.script:
        with contextlib.suppress(ApiError):  # only ApiError subclasses may come out
            await client.get_status(execution_id)
    assert (await client.get_status("exec_running")).progress == 45


async def test_unreachable_base_url_names_host_and_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        async with ExecutionsClient(f"http://127.0.0.1:{port}", Secret(KEY), timeout_s=2) as c:
            with pytest.raises(TransientError) as info:
                await c.get_status("exec_running")
    assert info.value.reason is TransientReason.CONNECTION
    assert f"127.0.0.1:{port}" in str(info.value)


@pytest.fixture
async def babble_url() -> AsyncIterator[str]:
    """A TCP server that answers a request with something that is not HTTP."""

    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff garbage\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


async def test_a_server_that_does_not_speak_http(babble_url: str) -> None:
    async with ExecutionsClient(babble_url, Secret(KEY), timeout_s=2) as c:
        with pytest.raises(TransientError) as info:
            await c.get_status("exec_running")
    assert info.value.reason is TransientReason.CONNECTION
    assert "malformed" in str(info.value)


# --- URLs, IDs, sessions ---------------------------------------------------------------------------


async def test_invalid_id_is_refused_before_any_request(client: ExecutionsClient, api: Api) -> None:
    for bad in ["../admin", "a/b", "", "exec 1", "%2e%2e", "x" * 129]:
        with pytest.raises(InvalidExecutionId):
            await client.get_status(bad)
    assert api.paths == []


async def test_base_path_prefix_is_kept(api: Api) -> None:
    async with ExecutionsClient(f"{api.url}/vendor/", Secret(KEY)) as c:
        with pytest.raises(ExecutionNotFound):  # the catch-all answers 404 for any other path
            await c.get_status("exec_running")
    assert api.paths == ["/vendor/api/v1/executions/exec_running/status"]


@pytest.mark.parametrize(
    "base_url",
    [
        "ftp://127.0.0.1",
        "127.0.0.1:8080",
        "http://",
        "not a url",
        "http://u:p@127.0.0.1",
        "http://h/?q=1",
        "",
    ],
)
def test_bad_base_url_is_a_usage_error_naming_it(base_url: str) -> None:
    with pytest.raises(UsageError) as info:
        ExecutionsClient(base_url, Secret(KEY))
    assert "base URL" in str(info.value)
    assert "p@" not in str(info.value)  # credentials in a URL are not echoed
    with pytest.raises(UsageError):
        check_base_url(base_url)


@pytest.mark.parametrize("key", ["", "sk_test with space", "sk_test\r\nX-Evil: 1", "sk_tést"])
def test_key_that_cannot_be_a_header_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(UsageError) as info:
        ExecutionsClient("http://127.0.0.1:1", Secret(key))
    assert (not key) or key not in str(info.value)


async def test_owned_session_has_explicit_limits_and_is_closed(api: Api) -> None:
    c = ExecutionsClient(api.url, Secret(KEY), timeout_s=4.5, max_connections=3)
    await c.get_status("exec_running")
    session = c._session
    assert session is not None
    assert session.timeout.total == 4.5
    assert isinstance(session.connector, aiohttp.TCPConnector)
    assert session.connector.limit == 3
    await c.close()
    assert session.closed


async def test_given_session_is_used_and_left_open(api: Api) -> None:
    async with aiohttp.ClientSession() as session:
        async with ExecutionsClient(api.url, Secret(KEY), session=session) as c:
            await c.get_status("exec_running")
        assert not session.closed
        async with session.get(f"{api.url}/still-usable") as resp:
            assert resp.status == 404
    assert api.keys[0] == KEY


async def test_each_request_is_logged_at_debug(client: ExecutionsClient) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.get_status("exec_running")
        with pytest.raises(ExecutionNotFound):
            await client.get_status("exec_404")
    lines = [entry for entry in logs if entry["event"] == "status request"]
    assert [(e["execution_id"], e["status_code"], e["log_level"]) for e in lines] == [
        ("exec_running", 200, "debug"),
        ("exec_404", 404, "debug"),
    ]
    assert all(isinstance(e["latency_ms"], float) and e["latency_ms"] >= 0 for e in lines)


# --- the key never leaks ---------------------------------------------------------------------------


def _texts_of(exc: BaseException) -> list[str]:
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return texts


async def _leaky_run(api_url: str, dead_url: str, babble_url: str) -> list[str]:
    """401, 5xx, timeout, cut connection, refused connection, bad body, not HTTP: every text made."""
    texts: list[str] = []
    async with ExecutionsClient(api_url, Secret(KEY), timeout_s=TIMEOUT_S) as c:
        texts += [repr(c), str(c)]
        for execution_id in ["exec_401", "exec_500", "exec_slow", "exec_cut", "exec_html", "exec_running"]:
            try:
                await c.get_status(execution_id)
            except ApiError as exc:
                texts += _texts_of(exc)
                structlog.get_logger("test").warning("poll failed", error=exc, execution_id=execution_id)
    for url in (dead_url, babble_url):  # aiohttp's own errors here hold the request headers
        async with ExecutionsClient(url, Secret(KEY), timeout_s=TIMEOUT_S) as c:
            with pytest.raises(TransientError) as info:
                await c.get_status("exec_running")
            texts += _texts_of(info.value)
    return texts


async def test_key_never_appears_in_logs_exceptions_or_reprs(api: Api, babble_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        rendered = io.StringIO()
        configure_logging("debug", fmt="json", stream=rendered)
        try:
            texts = await _leaky_run(api.url, dead_url, babble_url)  # through the real pipeline, rendered
            with structlog.testing.capture_logs() as captured:
                texts += await _leaky_run(api.url, dead_url, babble_url)
        finally:
            reset_logging()
    output = rendered.getvalue()
    assert '"status request"' in output  # the debug lines were rendered
    assert len([e for e in captured if e["event"] == "status request"]) == 8
    assert KEY not in output
    assert KEY not in repr(captured)
    assert all(KEY not in text for text in texts)
    assert api.keys  # it was sent, though
    assert all(k == KEY for k in api.keys)


# --- Retry-After parsing ---------------------------------------------------------------------------

EPOCH = NOW.timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("0", 0.0),
        ("  12 ", 12.0),
        ("1.5", 1.5),
        ("300", 300.0),
        ("301", 300.0),
        ("9" * 400, 300.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        (format_datetime(NOW + timedelta(days=3), usegmt=True), 300.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
        ("Tue, 11 Nov 2025 10:31:00 -0000", 60.0),
        ("Tuesday, 11-Nov-25 10:31:00 GMT", 60.0),
        ("-5", None),
        ("", None),
        ("   ", None),
        (None, None),
        ("soon", None),
        ("inf", None),
        ("nan", None),
        ("1e3", None),
        ("7 seconds", None),
        ("Tue, 99 Nov 2025 10:31:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, EPOCH, 300.0) == expected


def test_parse_retry_after_zero_cap() -> None:
    assert parse_retry_after("30", EPOCH, 0.0) == 0.0


# --- construction ----------------------------------------------------------------------------------


def test_construction_checks() -> None:
    with pytest.raises(UsageError, match="not a URL"):
        ExecutionsClient("http://[::1", Secret(KEY))
    with pytest.raises(UsageError, match="must be given as a Secret"):
        ExecutionsClient("http://127.0.0.1:1", KEY)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="client limits"):
        ExecutionsClient("http://127.0.0.1:1", Secret(KEY), timeout_s=0)
    client = ExecutionsClient("https://api.example.com/", Secret(KEY))
    assert client.base_url == "https://api.example.com"
    assert str(client.status_url("exec_1")) == "https://api.example.com/api/v1/executions/exec_1/status"
    assert KEY not in repr(client)


async def test_an_odd_value_inside_a_known_field_is_a_bad_shape(
    client: ExecutionsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(execution_id: str, payload: object) -> object:
        raise OverflowError("cannot convert")

    monkeypatch.setattr("monitor.api.client.parse_status", explode)
    error = await _transient(client, "exec_running")
    assert error.reason is TransientReason.BAD_SHAPE
    assert error.__context__ is None

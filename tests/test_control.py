"""The control API on a real loopback server, with an in-memory backend standing in for the engine."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from control_fakes import MemoryBackend
from multidict import CIMultiDictProxy
from yarl import URL

from monitor.errors import UsageError
from monitor.metrics import Metrics
from monitor.secrets import Secret
from monitor.service.control import (
    ControlServer,
    ControlState,
    check_listen_allowed,
    create_control_app,
    is_loopback,
    openapi_document,
)

TOKEN = "test-control-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Api:
    url: str
    session: aiohttp.ClientSession
    backend: MemoryBackend
    state: ControlState

    async def call(
        self, method: str, path: str, *, auth: bool = True, **kwargs: Any
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        headers = dict(kwargs.pop("headers", {}))
        if auth:
            headers.update(AUTH)
        url = URL(self.url + path, encoded=True)  # sent as written: no client-side normalising of %2E%2E
        async with self.session.request(method, url, headers=headers, **kwargs) as response:
            raw = await response.read()
            assert response.content_type in ("application/json", "text/plain"), response.content_type
            body = json.loads(raw) if response.content_type == "application/json" else raw.decode()
            return response.status, body, response.headers


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    backend = MemoryBackend()
    state = ControlState(token=Secret(TOKEN), backend=backend, metrics=Metrics())
    server = ControlServer(create_control_app(state, max_body_bytes=64 * 1024), "127.0.0.1", 0)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(server.url, session, backend, state)
    finally:
        await server.stop()


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/executions", "/v1/executions/exec_1", "/metrics", "/openapi.json", "/nowhere"])
async def test_every_endpoint_but_healthz_needs_the_token(api: Api, path: str) -> None:
    status, body, headers = await api.call("GET", path, auth=False)
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = await api.call("GET", path, auth=False, headers={"Authorization": "Bearer wrong"})
    assert status == 401


@pytest.mark.parametrize(
    "header",
    [f"Basic {TOKEN}", TOKEN, "Bearer", f"Bearer {TOKEN}x", "Bearer t\u00e9st", f"Bearer {TOKEN[:-1]}"],
)
async def test_malformed_or_wrong_authorization_is_401(api: Api, header: str) -> None:
    status, body, _ = await api.call("GET", "/v1/executions", auth=False, headers={"Authorization": header})
    assert (status, body["error"]["code"]) == (401, "unauthorized")


async def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}
    status, _, _ = await api.call("GET", "/v1/executions", auth=False, headers=headers)
    assert status == 200


async def test_a_state_without_a_token_refuses_everything_but_healthz(api: Api) -> None:
    api.state.token = None  # never open: the daemon always sets one (generated when none is configured)
    for auth in (False, True):
        status, body, _ = await api.call("GET", "/v1/executions", auth=auth)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, _, _ = await api.call("POST", "/v1/executions", auth=False, json={"ids": ["exec_1"]})
    assert status == 401
    assert api.backend.snapshot() == set()
    assert (await api.call("GET", "/healthz", auth=False))[0] == 200


# --- browsers: Host (DNS rebinding), Origin (cross-origin requests), Content-Type --------------


def port_of(api: Api) -> int:
    port = URL(api.url).port
    assert port is not None
    return port


@pytest.mark.parametrize("path", ["/v1/executions", "/metrics", "/healthz", "/openapi.json"])
async def test_a_host_that_is_not_this_listener_is_421(api: Api, path: str) -> None:
    port = port_of(api)
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", f"a@127.0.0.1:{port}"):
        status, body, _ = await api.call("GET", path, headers={"Host": host})
        assert (status, body["error"]["code"]) == (421, "misdirected_request"), host


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "127.9.9.9:{port}"])
async def test_the_listen_address_and_loopback_names_are_accepted(api: Api, host: str) -> None:
    status, _, _ = await api.call("GET", "/v1/executions", headers={"Host": host.format(port=port_of(api))})
    assert status == 200


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_an_ipv6_loopback_listener(api: Api) -> None:
    server = ControlServer(create_control_app(api.state, listen_host="::1"), "::1", 0)
    await server.start()
    try:
        port = server.port
        for host, want in ((f"[::1]:{port}", 200), (f"localhost:{port}", 200), (f"[::2]:{port}", 421)):
            async with api.session.get(server.url + "/v1/executions", headers={**AUTH, "Host": host}) as response:
                assert response.status == want, host
    finally:
        await server.stop()


async def test_the_configured_listen_name_is_accepted(api: Api) -> None:
    app = create_control_app(api.state, listen_host="execmon.internal")
    server = ControlServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        for host, want in (("execmon.internal", 200), ("other.internal", 421)):
            headers = {**AUTH, "Host": f"{host}:{server.port}"}
            async with api.session.get(server.url + "/v1/executions", headers=headers) as response:
                assert response.status == want, host
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://evil.example:{port}", "null", "https://127.0.0.1:{port}",
               "http://127.0.0.1:{other}", "file://", "http://127.0.0.1:{port}/path"],
)  # fmt: skip
async def test_a_foreign_origin_is_403_and_tracks_nothing(api: Api, origin: str) -> None:
    port = port_of(api)
    headers = {"Origin": origin.format(port=port, other=port + 1)}
    status, body, _ = await api.call("POST", "/v1/executions", json={"ids": ["exec_1"]}, headers=headers)
    assert (status, body["error"]["code"]) == (403, "forbidden_origin")
    status, _, _ = await api.call("GET", "/v1/executions", headers=headers)
    assert status == 403
    assert api.backend.snapshot() == set()


async def test_the_servers_own_origin_is_accepted(api: Api) -> None:
    for origin in (api.url, f"http://localhost:{port_of(api)}"):
        status, _, _ = await api.call("POST", "/v1/executions", json={"ids": ["exec_1"]}, headers={"Origin": origin})
        assert status in (200, 201), origin


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
async def test_a_body_that_is_not_json_is_415(api: Api, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = b'{"ids": ["exec_1"]}'
    for method, path in (("POST", "/v1/executions"), ("DELETE", "/v1/executions/exec_1")):
        status, answer, _ = await api.call(method, path, data=body, headers=headers)
        assert (status, answer["error"]["code"]) == (415, "unsupported_media_type"), (method, content_type)
    assert api.backend.snapshot() == set()


async def test_json_with_a_charset_and_bodiless_requests_pass(api: Api) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    status, _, _ = await api.call("POST", "/v1/executions", data=b'{"ids": ["exec_1"]}', headers=headers)
    assert status == 201
    status, _, _ = await api.call("DELETE", "/v1/executions/exec_1")  # no body, no Content-Type
    assert status == 200


async def test_a_browser_style_cross_origin_post_never_succeeds(api: Api) -> None:
    """What a page on evil.example can send without a preflight: text/plain, its Origin, no token.
    Refused at the first check it fails (Origin), whatever else is wrong with it."""
    port = port_of(api)
    simple = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    body = json.dumps({"ids": [f"exec_{i}" for i in range(10_000)]}).encode()
    for auth, host, want in ((False, f"127.0.0.1:{port}", 403), (True, f"127.0.0.1:{port}", 403),
                             (False, f"evil.example:{port}", 421)):  # fmt: skip
        headers = {**simple, "Host": host}
        status, _, _ = await api.call("POST", "/v1/executions", auth=auth, data=body, headers=headers)
        assert status == want, (auth, host)
    assert api.backend.snapshot() == set()
    assert api.backend.track_calls == []


# --- health -----------------------------------------------------------------------------------


async def test_healthz_follows_the_backend_without_a_token(api: Api) -> None:
    assert (await api.call("GET", "/healthz", auth=False))[:2] == (200, {"status": "ok"})
    api.backend.health_state = (False, "the API key was rejected (401)")
    status, body, _ = await api.call("GET", "/healthz", auth=False)
    assert status == 503
    assert body == {"status": "unhealthy", "reason": "the API key was rejected (401)"}


async def test_healthz_while_starting_and_stopping(api: Api) -> None:
    backend = api.state.backend
    api.state.backend = None
    status, body, _ = await api.call("GET", "/healthz", auth=False)
    assert (status, body["reason"]) == (503, "starting")
    status, body, _ = await api.call("GET", "/v1/executions")
    assert (status, body["error"]["code"]) == (503, "unavailable")
    api.state.backend = backend
    api.state.stopping = True
    status, body, _ = await api.call("GET", "/healthz", auth=False)
    assert (status, body["reason"]) == (503, "stopping")
    status, body, _ = await api.call("POST", "/v1/executions", json={"ids": ["exec_1"]})
    assert status == 503
    assert api.backend.snapshot() == set()


# --- tracking ---------------------------------------------------------------------------------


async def test_track_adds_then_reports_already_tracked(api: Api) -> None:
    payload = {
        "ids": ["exec_a", "exec_b", "exec_a"],
        "deadline_s": 60,
        "labels": {"team": "ml"},
        "group": "g",
    }
    status, body, _ = await api.call("POST", "/v1/executions", json=payload)
    assert status == 201
    assert body == {"added": ["exec_a", "exec_b"], "already_tracked": []}
    assert api.backend.executions["exec_a"]["labels"] == {"team": "ml"}
    assert api.backend.executions["exec_a"]["group"] == "g"
    status, body, _ = await api.call("POST", "/v1/executions", json={"ids": ["exec_b", "exec_c"]})
    assert (status, body) == (201, {"added": ["exec_c"], "already_tracked": ["exec_b"]})
    status, body, _ = await api.call("POST", "/v1/executions", json={"ids": ["exec_c"]})
    assert (status, body) == (200, {"added": [], "already_tracked": ["exec_c"]})


async def test_invalid_ids_are_all_named_and_nothing_is_tracked(api: Api) -> None:
    ids = ["exec_ok", "../admin", "a b", "exec_ok2", "x" * 300, 7, ""]
    status, body, _ = await api.call("POST", "/v1/executions", json={"ids": ids})
    assert status == 400
    error = body["error"]
    assert error["code"] == "invalid_ids"
    assert error["invalid_ids"] == ["../admin", "a b", "x" * 127 + "...", "7", ""]
    assert "../admin" in error["message"]
    assert api.backend.snapshot() == set()
    assert api.backend.track_calls == []


async def test_more_than_10000_ids_is_rejected_whole(api: Api) -> None:
    app_limit = 1_000_000
    server = ControlServer(create_control_app(api.state, max_body_bytes=app_limit), "127.0.0.1", 0)
    await server.start()
    try:
        ids = [f"e{i}" for i in range(10_001)]
        async with api.session.post(server.url + "/v1/executions", json={"ids": ids}, headers=AUTH) as response:
            body = await response.json()
        assert response.status == 400
        assert body["error"]["code"] == "too_many_ids"
        async with api.session.post(
            server.url + "/v1/executions", json={"ids": ids[:10_000]}, headers=AUTH
        ) as response:
            assert response.status == 201
    finally:
        await server.stop()
    assert len(api.backend.snapshot()) == 10_000


async def test_body_over_the_limit_is_413_json(api: Api) -> None:
    ids = [f"exec_{i:06d}" for i in range(10_000)]  # ~140 kB > 64 kB
    status, body, _ = await api.call("POST", "/v1/executions", json={"ids": ids})
    assert status == 413
    assert body["error"]["code"] == "body_too_large"
    assert api.backend.snapshot() == set()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'{"ids": ["a"], "deadline_s": NaN}', "invalid_json"),
        (b'{"ids": ["a"], "deadline_s": Infinity}', "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[" * 100_00 + b"]" * 100_00, "invalid_json"),
        (b"", "invalid_json"),
        (b'["exec_1"]', "bad_request"),
        (b"{}", "bad_request"),
        (b'{"ids": []}', "bad_request"),
        (b'{"ids": "exec_1"}', "bad_request"),
        (b'{"ids": ["exec_1"], "deadline": 5}', "bad_request"),
        (b'{"ids": ["exec_1"], "deadline_s": 0}', "bad_request"),
        (b'{"ids": ["exec_1"], "deadline_s": -1}', "bad_request"),
        (b'{"ids": ["exec_1"], "deadline_s": true}', "bad_request"),
        (b'{"ids": ["exec_1"], "deadline_s": "60"}', "bad_request"),
        (b'{"ids": ["exec_1"], "labels": {"k": 1}}', "bad_request"),
        (b'{"ids": ["exec_1"], "labels": {"": "v"}}', "bad_request"),
        (b'{"ids": ["exec_1"], "labels": ["k=v"]}', "bad_request"),
        (b'{"ids": ["exec_1"], "labels": null}', "bad_request"),
        (b'{"ids": ["exec_1"], "labels": {"k": "\\ud800"}}', "bad_request"),
        (b'{"ids": ["exec_1"], "group": ""}', "bad_request"),
        (b'{"ids": ["exec_1"], "group": 5}', "bad_request"),
        (b'{"ids": ["exec_1"], "group": "g", "batch": "../b"}', "bad_request"),
        (b'{"ids": ["exec_1"], "group": "g", "batch": 7}', "bad_request"),
    ],
)
async def test_bad_bodies_are_400_json_and_track_nothing(api: Api, raw: bytes, code: str) -> None:
    headers = {"Content-Type": "application/json"}
    status, body, _ = await api.call("POST", "/v1/executions", data=raw, headers=headers)
    assert status == 400
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert api.backend.snapshot() == set()


async def test_nulls_mean_absent(api: Api) -> None:
    payload = {"ids": ["exec_1"], "deadline_s": None, "group": None}
    status, _, _ = await api.call("POST", "/v1/executions", json=payload)
    assert status == 201


# --- listing, one, removal --------------------------------------------------------------------


async def test_list_pages_and_filters(api: Api) -> None:
    for i in range(5):
        api.backend.add_view(f"exec_{i}", state="running" if i % 2 else "completed")
    status, body, _ = await api.call("GET", "/v1/executions?limit=2&offset=1")
    assert status == 200
    assert [v["execution_id"] for v in body["executions"]] == ["exec_1", "exec_2"]
    assert (body["total"], body["limit"], body["offset"]) == (5, 2, 1)
    _, body, _ = await api.call("GET", "/v1/executions?status=running")
    assert [v["execution_id"] for v in body["executions"]] == ["exec_1", "exec_3"]
    _, body, _ = await api.call("GET", "/v1/executions?status=terminal")
    assert body["total"] == 3


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=10001", "limit=abc", "limit=-1", "limit=1_0", "offset=-5", "status=done", "status="],
)
async def test_bad_list_parameters_are_400(api: Api, query: str) -> None:
    status, body, _ = await api.call("GET", f"/v1/executions?{query}")
    assert (status, body["error"]["code"]) == (400, "bad_request")


async def test_get_and_delete_one(api: Api) -> None:
    api.backend.add_view("exec_1", progress=40)
    status, body, _ = await api.call("GET", "/v1/executions/exec_1")
    assert (status, body["execution_id"], body["progress"]) == (200, "exec_1", 40)
    status, body, _ = await api.call("DELETE", "/v1/executions/exec_1")
    assert (status, body) == (200, {"execution_id": "exec_1", "removed": True})
    for method in ("GET", "DELETE"):
        status, body, _ = await api.call(method, "/v1/executions/exec_1")
        assert (status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("raw_id", ["a.b", "%2E%2E", "a%20b", "x" * 129, "%C3%A9"])
async def test_invalid_path_id_is_400(api: Api, raw_id: str) -> None:
    for method in ("GET", "DELETE"):
        status, body, _ = await api.call(method, f"/v1/executions/{raw_id}")
        assert status == 400
        assert body["error"]["code"] == "invalid_ids"


async def test_unknown_endpoint_and_method_are_json(api: Api) -> None:
    status, body, _ = await api.call("GET", "/v2/nothing")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body, headers = await api.call("PUT", "/v1/executions", json={})
    assert (status, body["error"]["code"]) == (405, "method_not_allowed")
    assert set(headers["Allow"].split(", ")) >= {"GET", "POST"}


async def test_a_backend_bug_is_a_json_500(api: Api) -> None:
    def broken(_status: str | None) -> int:
        raise RuntimeError("boom")

    api.backend.count_executions = broken  # type: ignore[method-assign,assignment]
    status, body, _ = await api.call("GET", "/v1/executions")
    assert (status, body["error"]["code"]) == (500, "internal")
    assert "boom" not in body["error"]["message"]


# --- metrics and the document ------------------------------------------------------------------


async def test_metrics_are_prometheus_text(api: Api) -> None:
    assert api.state.metrics is not None
    api.state.metrics.request("ok")
    status, body, headers = await api.call("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert 'execmon_api_requests_total{outcome="ok"} 1.0' in body


async def test_openapi_document_is_served(api: Api) -> None:
    status, body, _ = await api.call("GET", "/openapi.json")
    assert status == 200
    assert body == openapi_document()
    assert body["openapi"].startswith("3.")


# --- where it may listen ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.com", False)],
)  # fmt: skip
def test_non_loopback_needs_a_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    check_listen_allowed(host, Secret("some-token"))
    if loopback:
        check_listen_allowed(host, None)
    else:
        with pytest.raises(UsageError, match="without a token"):
            check_listen_allowed(host, None)


async def test_port_in_use_is_one_usage_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = ControlServer(create_control_app(ControlState()), "127.0.0.1", port)
        with pytest.raises(UsageError) as info:
            await server.start()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "in use" in message
    assert "\n" not in message

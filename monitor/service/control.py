"""The control API (aiohttp): hand executions to the daemon, list, inspect and drop them.

Served by `execmon run` on 127.0.0.1:8787 by default; the OpenAPI document (`openapi.json`, next to
this module) describes every endpoint. Rules that hold everywhere, checked in this order so that
a web page in the user's browser can never drive the daemon (DNS rebinding, cross-origin POSTs):
- 421 when `Host` does not name this listener (`_check_host`);
- 403 when an `Origin` header names another origin (`_check_origin`);
- 401 without `Authorization: Bearer <token>` (constant-time compare), on every endpoint but
  /healthz; there is always a token (the daemon generates one when none is configured), and a
  state without one refuses every request;
- 415 for a body that is not `Content-Type: application/json`;
- every error is JSON, `{"error": {"code", "message"}}` (plus `invalid_ids` for bad IDs);
- a POST is all or nothing: one invalid ID rejects the request and nothing from it is tracked.

The engine implements `ControlBackend`; this module knows nothing else about it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from monitor.errors import StoreFault, UsageError
from monitor.ids import is_valid_execution_id
from monitor.logs import get_logger
from monitor.metrics import Metrics
from monitor.records import TrackResult
from monitor.secrets import Secret
from monitor.service.validation import (
    ApiError,
    ErrorCode,
    check_query,
    decode_json,
    parse_list_query,
    parse_track_request,
)

log = get_logger(__name__)

HEALTH_PATH = "/healthz"  # the one endpoint open without a token (load balancers, systemd checks)


class ControlBackend(Protocol):
    """What the control API needs from the engine.

    `status` filters are a state (pending, running, completed, failed, cancelled, not_found,
    timed_out), `terminal` (any of the five ended states), `active` (pending or running), `stalled`
    (running, standing still), or None. Views are JSON-able dicts with at least: execution_id,
    state, progress, polls, tracked_since, last_polled_at, next_poll_at, group, labels, delivered,
    stalled_since.
    """

    async def track(
        self,
        ids: list[str],
        *,
        deadline_s: float | None,
        group: str | None,
        labels: dict[str, str],
        batch: str | None = None,
    ) -> TrackResult: ...

    async def untrack(self, execution_id: str) -> bool: ...

    def list_executions(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]: ...

    def count_executions(self, status: str | None) -> int: ...

    def get_execution(self, execution_id: str) -> dict[str, Any] | None: ...

    def health(self) -> tuple[bool, str | None]: ...

    async def retry_dead_letters(self, *, sink: str | None, event_id: str | None) -> int:
        """Queue dead letters again (all, one sink's or one event's): how many. StoreFault: none."""
        ...


@dataclass(slots=True)
class ControlState:
    """What the handlers read on each request; the daemon swaps parts of it on start and reload."""

    token: Secret | None = None  # None: every request but /healthz is refused (401)
    backend: ControlBackend | None = None  # None while the engine is starting
    metrics: Metrics | None = None
    stopping: bool = False  # set on SIGTERM: no new executions, /healthz says so


STATE_KEY = web.AppKey("execmon_control_state", ControlState)
MAX_BODY_KEY = web.AppKey("execmon_control_max_body_bytes", int)
LISTEN_HOST_KEY = web.AppKey("execmon_control_listen_host", str)
JSON_TYPE = "application/json"


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document shipped with the package (kept in the repo, not generated)."""
    text = resources.files("monitor.service").joinpath("openapi.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach ("localhost", 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


def check_listen_allowed(host: str, configured_token: Secret | None) -> None:
    """Beyond loopback, the token must be configured: a generated one sits in a 0600 file that
    clients elsewhere cannot read, so its operator has to choose how it is handed out."""
    if configured_token is None and not is_loopback(host):
        raise UsageError(
            f"refusing to serve the control API on {host} without a token in the config: set the control "
            "token (EXECMON_CONTROL_TOKEN, or [control] token_env / token_file) or listen on 127.0.0.1"
        )


def _json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message, **extra}
    return web.json_response({"error": body}, status=status)


def _state(request: web.Request) -> ControlState:
    return request.app[STATE_KEY]


def _token_matches(header: str | None, token: Secret | None) -> bool:
    if not header or token is None:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Bytes, because compare_digest refuses non-ASCII str; constant time either way.
    return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), token.reveal().encode())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every error leaves as JSON, whoever raised it."""
    try:
        return await handler(request)
    except ApiError as exc:
        extra = {"invalid_ids": exc.invalid_ids} if exc.invalid_ids is not None else {}
        response = _json_error(exc.status, exc.code, exc.message, **extra)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY_KEY]
        response = _json_error(413, ErrorCode.BODY_TOO_LARGE, f"the request body is over {limit} bytes")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = _json_error(405, ErrorCode.METHOD_NOT_ALLOWED, f"{request.method} is not allowed here")
        response.headers["Allow"] = allowed
    except web.HTTPNotFound:
        response = _json_error(404, ErrorCode.NOT_FOUND, f"no such endpoint: {request.path[:200]}")
    except web.HTTPException as exc:
        response = _json_error(exc.status, ErrorCode.BAD_REQUEST, exc.reason)
    except Exception:
        log.exception("control API request failed", method=request.method, path=request.path[:200])
        response = _json_error(500, ErrorCode.INTERNAL, "internal error (see the daemon's log)")
    return response


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address (an IPv4-mapped IPv6 one as IPv4, no zone), or None for a name."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _authority(value: str) -> tuple[str, int] | None:
    """(host in lower case, port; 80 when absent) of a `Host` value, or None when it is not one."""
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or "@" in parts.netloc or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname, 80 if port is None else port


def _names_this_server(authority: str, request: web.Request) -> bool:
    """True when `authority` (host:port) is this listener: its port, and as host the configured listen
    host, the address the connection came in on, or, on loopback, `localhost` or a loopback address."""
    named = _authority(authority)
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if named is None or not sockname:
        return False
    host, port = named
    if port != sockname[1]:
        return False
    local = _ip(str(sockname[0]))
    if host == request.app[LISTEN_HOST_KEY] or (local is not None and _ip(host) == local):
        return True
    return local is not None and local.is_loopback and is_loopback(host)


@web.middleware
async def _check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """421 for a `Host` naming anything else: a DNS-rebinding page names its own domain."""
    hosts = request.headers.getall("Host", [])
    if len(hosts) != 1 or not _names_this_server(hosts[0], request):
        raise ApiError(421, ErrorCode.MISDIRECTED, "the Host header does not name this server's address")
    return await handler(request)


@web.middleware
async def _check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 for a request from a web page of another origin (browsers send `Origin` on those)."""
    for origin in request.headers.getall("Origin", []):
        scheme, sep, authority = origin.partition("://")
        if scheme.lower() != "http" or not sep or not _names_this_server(authority, request):  # also "null"
            raise ApiError(403, ErrorCode.FORBIDDEN_ORIGIN, "cross-origin requests are refused")
    return await handler(request)


@web.middleware
async def _require_json_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for a body of another type: a browser can send text/plain cross-origin without asking first."""
    if request.body_exists and request.content_type != JSON_TYPE:
        message = f"a request body must be JSON (Content-Type: {JSON_TYPE})"
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, message)
    return await handler(request)


@web.middleware
async def _require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = _state(request).token
    authorized = request.path == HEALTH_PATH or _token_matches(request.headers.get("Authorization"), token)
    if not authorized:
        response = _json_error(401, ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="execmon"'
        return response
    return await handler(request)


def _backend(request: web.Request) -> ControlBackend:
    backend = _state(request).backend
    if backend is None:
        raise ApiError(503, ErrorCode.UNAVAILABLE, "the daemon is starting; try again in a moment")
    return backend


def _path_id(request: web.Request) -> str:
    check_query(request.query)
    execution_id = request.match_info["execution_id"]
    if not is_valid_execution_id(execution_id):
        raise ApiError.for_invalid_ids([execution_id])
    return execution_id


async def _track(request: web.Request) -> web.Response:
    state = _state(request)
    if state.stopping:
        raise ApiError(503, ErrorCode.UNAVAILABLE, "the daemon is stopping and takes no new executions")
    backend = _backend(request)
    check_query(request.query)
    body = await request.read()  # capped by client_max_size: HTTPRequestEntityTooLarge -> 413
    wanted = parse_track_request(body)
    result = await backend.track(
        wanted.ids, deadline_s=wanted.deadline_s, group=wanted.group, labels=wanted.labels, batch=wanted.batch
    )
    log.info("executions tracked", added=len(result.added), already_tracked=len(result.already_tracked))
    status = 201 if result.added else 200
    payload: dict[str, object] = {"added": list(result.added), "already_tracked": list(result.already_tracked)}
    if result.batch is not None:
        payload["batch"] = result.batch
    return web.json_response(payload, status=status)


async def _list(request: web.Request) -> web.Response:
    backend = _backend(request)
    query = parse_list_query(request.query)
    views = backend.list_executions(query.status, query.limit, query.offset)
    total = backend.count_executions(query.status)
    payload = {"executions": views, "total": total, "limit": query.limit, "offset": query.offset}
    return web.json_response(payload)


async def _get(request: web.Request) -> web.Response:
    execution_id = _path_id(request)
    view = _backend(request).get_execution(execution_id)
    if view is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"{execution_id} is not tracked")
    return web.json_response(view)


async def _delete(request: web.Request) -> web.Response:
    execution_id = _path_id(request)
    if not await _backend(request).untrack(execution_id):
        raise ApiError(404, ErrorCode.NOT_FOUND, f"{execution_id} is not tracked")
    log.info("execution untracked", execution_id=execution_id)
    return web.json_response({"execution_id": execution_id, "removed": True})


def _retry_filter(body: bytes) -> tuple[str | None, str | None]:
    """(sink, event_id) from an optional `{"sink": ..., "event_id": ...}` body; none: every dead letter."""
    payload = decode_json(body) if body else {}
    if not (
        isinstance(payload, dict)
        and set(payload) <= {"sink", "event_id"}
        and all(isinstance(v, str) and 0 < len(v) <= 200 for v in payload.values())
    ):
        raise ApiError(400, ErrorCode.BAD_REQUEST, "the body may only have 'sink' and 'event_id' (non-empty strings)")
    return payload.get("sink"), payload.get("event_id")


async def _retry_dead_letters(request: web.Request) -> web.Response:
    backend = _backend(request)
    check_query(request.query)
    sink, event_id = _retry_filter(await request.read())
    try:
        count = await backend.retry_dead_letters(sink=sink, event_id=event_id)
    except StoreFault:
        raise ApiError(503, ErrorCode.UNAVAILABLE, "the state store cannot be written right now; try again") from None
    return web.json_response({"retried": count})


async def _health(request: web.Request) -> web.Response:
    state = _state(request)
    ok: bool
    reason: str | None
    if state.stopping:
        ok, reason = False, "stopping"
    elif state.backend is None:
        ok, reason = False, "starting"
    else:
        ok, reason = state.backend.health()
    if ok:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unhealthy", "reason": reason}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    metrics = _state(request).metrics
    if metrics is None:
        raise ApiError(503, ErrorCode.UNAVAILABLE, "metrics are not ready yet")
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # carries a version parameter aiohttp would split
    return response


async def _openapi(_request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def create_control_app(
    state: ControlState, *, max_body_bytes: int = 1_048_576, listen_host: str = "127.0.0.1"
) -> web.Application:
    """The aiohttp application; `state` is read on every request, so it can change while serving.

    `listen_host` is the configured listen host, a name that `Host` may carry besides the address
    a connection comes in on."""
    middlewares = [_errors_as_json, _check_host, _check_origin, _require_token, _require_json_body]
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[STATE_KEY] = state
    app[MAX_BODY_KEY] = max_body_bytes
    app[LISTEN_HOST_KEY] = listen_host.strip("[]").lower()
    app.router.add_post("/v1/executions", _track)
    app.router.add_get("/v1/executions", _list)
    app.router.add_get("/v1/executions/{execution_id}", _get)
    app.router.add_delete("/v1/executions/{execution_id}", _delete)
    app.router.add_post("/v1/dead-letters/retry", _retry_dead_letters)
    app.router.add_get(HEALTH_PATH, _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


class ControlServer:
    """The control app on one TCP address. A busy port is a `UsageError` (one line, exit 2)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        # The daemon owns the access log (structlog); a short shutdown wait keeps SIGTERM quick.
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise UsageError(f"cannot serve the control API on {self.host}:{self.port}: {reason}") from None
        self._runner = runner
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        log.info("control API listening", url=self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

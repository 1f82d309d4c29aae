"""The control API (aiohttp): hand executions to the daemon, list, inspect and drop them.

Served by `execmon run` on 127.0.0.1:8787 by default; the OpenAPI document (`openapi.json`, next to
this module) describes every endpoint. Rules that hold everywhere:
- every endpoint but /healthz needs `Authorization: Bearer <token>` when a token is configured
  (compared in constant time); without a token the server only listens on a loopback address;
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

from aiohttp import web

from monitor.errors import UsageError
from monitor.ids import is_valid_execution_id
from monitor.logs import get_logger
from monitor.metrics import Metrics
from monitor.records import TrackResult
from monitor.secrets import Secret
from monitor.service.validation import ApiError, ErrorCode, check_query, parse_list_query, parse_track_request

log = get_logger(__name__)

HEALTH_PATH = "/healthz"  # the one endpoint open without a token (load balancers, systemd checks)


class ControlBackend(Protocol):
    """What the control API needs from the engine.

    `status` filters are a state (pending, running, completed, failed, cancelled, not_found,
    timed_out), `terminal` (any of the five ended states), `active` (pending or running), or None.
    Views are JSON-able dicts with at least: execution_id, state, progress, polls, tracked_since,
    last_polled_at, next_poll_at, group, labels, delivered.
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


@dataclass(slots=True)
class ControlState:
    """What the handlers read on each request; the daemon swaps parts of it on start and reload."""

    token: Secret | None = None
    backend: ControlBackend | None = None  # None while the engine is starting
    metrics: Metrics | None = None
    stopping: bool = False  # set on SIGTERM: no new executions, /healthz says so


STATE_KEY = web.AppKey("execmon_control_state", ControlState)
MAX_BODY_KEY = web.AppKey("execmon_control_max_body_bytes", int)


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


def check_listen_allowed(host: str, token: Secret | None) -> None:
    """Refuse to expose an unauthenticated control API beyond this machine."""
    if token is None and not is_loopback(host):
        raise UsageError(
            f"refusing to serve the control API on {host} without a token: set the control token "
            "(EXECMON_CONTROL_TOKEN, or [control] token_env / token_file) or listen on 127.0.0.1"
        )


def _json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message, **extra}
    return web.json_response({"error": body}, status=status)


def _state(request: web.Request) -> ControlState:
    return request.app[STATE_KEY]


def _token_matches(header: str | None, token: Secret) -> bool:
    if not header:
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


@web.middleware
async def _require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = _state(request).token
    if token is not None and request.path != HEALTH_PATH:
        authorized = _token_matches(request.headers.get("Authorization"), token)
    else:
        authorized = True
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


def create_control_app(state: ControlState, *, max_body_bytes: int = 1_048_576) -> web.Application:
    """The aiohttp application; `state` is read on every request, so it can change while serving."""
    app = web.Application(middlewares=[_errors_as_json, _require_token], client_max_size=max_body_bytes)
    app[STATE_KEY] = state
    app[MAX_BODY_KEY] = max_body_bytes
    app.router.add_post("/v1/executions", _track)
    app.router.add_get("/v1/executions", _list)
    app.router.add_get("/v1/executions/{execution_id}", _get)
    app.router.add_delete("/v1/executions/{execution_id}", _delete)
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

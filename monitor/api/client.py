"""The Executions API client: one status request in, one StatusRecord or one ApiError out.

Every answer row of the table in shared/api/NOTES.md maps to its own outcome; nothing the server
sends (or fails to send) escapes as anything but an `ApiError` subclass. IDs are validated before
any URL is built, and the URL is built as a string and never normalised, so an ID can only ever
address `/api/v1/executions/<id>/status` below the base URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self

import aiohttp
from yarl import URL

from monitor.api.errors import (
    ApiError,
    ExecutionNotFound,
    KeyRejected,
    Throttled,
    TransientError,
    TransientReason,
)
from monitor.api.models import StatusRecord, parse_status
from monitor.errors import UsageError
from monitor.ids import validate_execution_id
from monitor.logs import get_logger
from monitor.secrets import Secret, redact

log = get_logger(__name__)

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
_MAX_CACHED_URLS = 100_000  # status URLs kept for reuse; the cache starts over beyond that
_DRAIN_BYTES = 64 * 1024  # error bodies are read this far so the connection can be reused
_DELTA_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: anything else could split a header


def parse_retry_after(value: str | None, now_epoch: float, cap: float) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP-date, capped at `cap`.

    A date already past means "now" (0.0). Negative, empty or unparsable values give None, so the
    caller falls back to its own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.match(text):
        return min(float(text), cap)  # a huge number of digits is inf, then the cap
    when = _http_date(text)
    if when is None:
        return None
    return min(max(0.0, when - now_epoch), cap)


def _http_date(text: str) -> float | None:
    """Epoch seconds of an HTTP-date (a zone-less one is taken as UTC), or None."""
    try:
        when: datetime = parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def check_base_url(base_url: str) -> URL:
    """The base URL as a yarl URL, or UsageError naming it: http(s), a host, no credentials/query."""
    shown = repr(str(base_url)[:200])
    try:
        url = URL(base_url)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"base URL {shown} is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"base URL {shown} must be http:// or https:// with a host, e.g. http://127.0.0.1:8080")
    if url.user is not None or url.password is not None:
        raise UsageError(f"base URL for host {url.host} must not contain credentials; the key goes in the API key")
    if url.raw_query_string or url.raw_fragment:
        raise UsageError(f"base URL {shown} must not have a query or a fragment")
    return url


async def check_reachable(base_url: str, timeout_s: float = 5.0) -> None:
    """Open (and close) a TCP connection to the API's host: no HTTP request, so no budget is spent.

    For the one-shot watch, where a wrong --base-url should be one clear line, not a retry loop.
    Raises UsageError naming host:port and what to check.
    """
    url = check_base_url(base_url)
    host, port = url.host or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        reason = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UsageError(
            f"cannot reach the API at {host}:{port} ({reason}): check --base-url or EXECMON_BASE_URL"
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _check_key(api_key: Secret) -> None:
    if not isinstance(api_key, Secret):
        raise UsageError("the API key must be given as a Secret (monitor.secrets)")
    if not _HEADER_SAFE.match(api_key.reveal()):
        raise UsageError("the API key is empty or holds characters not allowed in an HTTP header")


class ExecutionsClient:
    """Async client for `GET /api/v1/executions/{id}/status`; one aiohttp session for its life."""

    def __init__(
        self,
        base_url: str,
        api_key: Secret,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 10.0,
        max_connections: int = 10,
        retry_after_cap_s: float = 300.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`wall_clock` is used only to turn an HTTP-date Retry-After into seconds, and only when the
        answer carries no `Date` header (the server's own clock is preferred: no skew)."""
        self._base = check_base_url(base_url)
        self._prefix = str(self._base).rstrip("/")
        _check_key(api_key)
        if timeout_s <= 0 or max_connections < 1 or retry_after_cap_s < 0 or max_body_bytes < 1:
            raise UsageError("client limits must be positive (timeout, connections, body size; cap >= 0)")
        self._key = api_key
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._cap = retry_after_cap_s
        self._max_body = max_body_bytes
        self._wall_clock = wall_clock
        self._target = f"{self._base.host}:{self._base.port}"
        self._urls: dict[str, URL] = {}  # status URLs built so far (an ID is polled again and again)

    def __repr__(self) -> str:
        return f"ExecutionsClient(base_url={self._prefix!r}, api_key={self._key!r})"

    @property
    def base_url(self) -> str:
        return self._prefix

    def status_url(self, execution_id: str) -> URL:
        """The status URL for a valid ID (InvalidExecutionId otherwise), exactly as it is sent."""
        valid = validate_execution_id(execution_id)
        return URL(f"{self._prefix}/api/v1/executions/{valid}/status", encoded=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it (a session passed in belongs to the caller)."""
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily so that the client can be built outside a running loop.
        if self._session is None or (self._owns_session and self._session.closed):
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            # aiohttp silently re-sends an idempotent request once when a kept-alive connection drops;
            # every request costs budget at the server, so the budget must see each one: no hidden retry.
            session._retry_connection = False  # no public switch exists (aiohttp 3.14)
            self._session = session
        return self._session

    async def get_status(self, execution_id: str) -> StatusRecord:
        """One status request. Raises only ApiError subclasses (InvalidExecutionId before sending)."""
        url = self._urls.get(execution_id)
        if url is None:
            url = self.status_url(execution_id)  # validated once, then reused
            if len(self._urls) >= _MAX_CACHED_URLS:
                self._urls.clear()
            self._urls[execution_id] = url
        loop = asyncio.get_running_loop()
        started = loop.time()
        exchange = _Exchange()
        try:
            record = await self._request(execution_id, url, exchange)
        except ApiError as exc:
            _log_request(execution_id, exchange.status_code, loop.time() - started, exc)
            raise
        _log_request(execution_id, exchange.status_code, loop.time() - started, None)
        return record

    async def _request(self, execution_id: str, url: URL, exchange: _Exchange) -> StatusRecord:
        headers = {"X-API-Key": self._key.reveal(), "Accept": "application/json"}
        session = self._get_session()
        try:
            # No redirects: a 3xx is unexpected here, and following it could carry the key elsewhere.
            async with session.get(url, headers=headers, timeout=self._timeout, allow_redirects=False) as resp:
                exchange.status_code = resp.status
                return await self._interpret(execution_id, resp)
        except ApiError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = self._transport_error(exc)
        # Raised outside the handler: aiohttp's exception (whose request_info holds the headers,
        # key included) must not ride along as __context__.
        raise error

    def _transport_error(self, exc: BaseException) -> TransientError:
        target = self._target
        if isinstance(exc, TimeoutError):  # aiohttp's total timeout raises the builtin, not a ClientError
            detail = f"no complete answer from {target} within {self._timeout.total:g} s"
            return TransientError(TransientReason.TIMEOUT, detail)
        if isinstance(exc, aiohttp.ClientConnectorError):
            return TransientError(TransientReason.CONNECTION, f"cannot connect to {target} ({_why(exc.os_error)})")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return TransientError(TransientReason.CONNECTION, f"answer from {target} cut short ({_why(exc)})")
        if isinstance(exc, aiohttp.ClientResponseError):
            return TransientError(TransientReason.CONNECTION, f"malformed HTTP answer from {target} ({_why(exc)})")
        return TransientError(TransientReason.CONNECTION, f"connection to {target} failed ({_why(exc)})")

    async def _interpret(self, execution_id: str, resp: aiohttp.ClientResponse) -> StatusRecord:
        status = resp.status
        if status != 200:
            await _drain(resp)
            raise self._error_for(execution_id, resp)
        body = await self._read_capped(resp)
        return _decode_status(execution_id, body)

    def _error_for(self, execution_id: str, resp: aiohttp.ClientResponse) -> ApiError:
        status = resp.status
        if status in (401, 403):
            return KeyRejected(status)
        if status == 404:
            return ExecutionNotFound(execution_id)
        if status == 429:
            return Throttled(parse_retry_after(resp.headers.get("Retry-After"), self._now_for(resp), self._cap))
        if 500 <= status <= 599:
            return TransientError(TransientReason.SERVER_ERROR, f"server answered HTTP {status}")
        return TransientError(TransientReason.UNEXPECTED_STATUS, f"server answered HTTP {status}")

    def _now_for(self, resp: aiohttp.ClientResponse) -> float:
        """The server's idea of now (its Date header) when it sent one, else the wall clock."""
        server_now = _http_date(resp.headers.get("Date", ""))
        return self._wall_clock() if server_now is None else server_now

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, reading at most cap + 1 bytes: a larger body is refused, never buffered whole."""
        length = resp.content_length
        if length is not None:
            if length > self._max_body:
                raise self._too_large()
            return await resp.read()  # the parser stops at Content-Length: within the cap
        body = bytearray()
        while len(body) <= self._max_body:
            chunk = await resp.content.read(self._max_body + 1 - len(body))
            if not chunk:
                return bytes(body)
            body += chunk
        raise self._too_large()

    def _too_large(self) -> TransientError:
        return TransientError(TransientReason.TOO_LARGE, f"answer body over {self._max_body} bytes")


def _decode_status(execution_id: str, body: bytes) -> StatusRecord:
    """Body bytes to a StatusRecord, or TransientError (raised outside the handlers: no context)."""
    error: TransientError | None = None
    try:
        # What json.loads(body, parse_constant=..., parse_float=...) does, without a new decoder each time.
        payload: Any = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        error = TransientError(TransientReason.NOT_JSON, "answer body nests too deeply")
    except ValueError as exc:  # also UnicodeDecodeError and over-long integers
        error = TransientError(TransientReason.NOT_JSON, f"answer body is not JSON ({_why(exc)})")
    if error is not None:
        raise error
    try:
        return parse_status(execution_id, payload)
    except TransientError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:  # defence in depth: odd values in known fields
        error = TransientError(TransientReason.BAD_SHAPE, f"answer has an unusable field ({_why(exc)})")
    raise error


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read a little of an error body so that a short one leaves the connection reusable."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):  # the status line said enough
        await resp.content.read(_DRAIN_BYTES)


def _why(exc: BaseException | None) -> str:
    """A short, redacted description of a low-level error for a TransientError detail."""
    if exc is None:
        return "unknown"
    text = str(exc) or type(exc).__name__
    return redact(text[:200])


@dataclass(slots=True)
class _Exchange:
    """What one request got as far as it went (for the debug log line)."""

    status_code: int | None = None


def _log_request(execution_id: str, status_code: int | None, latency_s: float, error: ApiError | None) -> None:
    outcome = "ok" if error is None else _outcome_name(error)
    log.debug(
        "status request",
        execution_id=execution_id,
        status_code=status_code,
        latency_ms=round(latency_s * 1000, 1),
        outcome=outcome,
    )


def _outcome_name(error: ApiError) -> str:
    if isinstance(error, TransientError):
        return error.reason.value
    return {KeyRejected: "key_rejected", ExecutionNotFound: "not_found", Throttled: "throttled"}.get(
        type(error), type(error).__name__
    )

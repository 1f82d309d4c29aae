"""The webhook sink: POST each record as JSON, signed, with its event_id as the Idempotency-Key.

2xx: delivered. 408, 429, 5xx, timeouts and connection errors: retried (Retry-After honoured).
Any other status: permanent, a dead letter whose reason carries the status. Redirects are not
followed (a moved hook is a configuration problem). The URL is treated as a secret (chat hook
URLs carry tokens in the path): messages name only its scheme, host and port.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from typing import Any, Self

import aiohttp
from yarl import URL

from monitor._version import __version__
from monitor.api.client import parse_retry_after
from monitor.config import SinkConfig
from monitor.errors import UsageError
from monitor.secrets import Secret, redact, register_secret
from monitor.sinks.base import (
    BaseSink,
    DeliveryError,
    encode_record,
    optional_int,
    optional_str,
    optional_str_map,
    required_str,
)

RETRYABLE_STATUS = frozenset({408, 425, 429})
RETRY_AFTER_CAP_S = 3600.0  # the engine caps it again at the sink's backoff_cap_s
_SNIPPET_BYTES = 300
_SENSITIVE_HEADER = re.compile(r"auth|token|key|secret|cookie|signature|password", re.IGNORECASE)
_RESERVED_HEADERS = frozenset({"content-type", "idempotency-key", "x-execmon-signature", "content-length"})


class WebhookSink(BaseSink):
    KEYS = ("url", "secret_env", "headers", "concurrency")

    def __init__(
        self,
        url: URL,
        *,
        secret: Secret | None = None,
        headers: dict[str, str] | None = None,
        concurrency: int = 4,
        timeout_s: float = 10.0,
    ) -> None:
        self._url = url
        self._secret = secret
        self._headers = dict(headers or {})
        self.concurrency = concurrency
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self.target = f"{url.scheme}://{url.host}:{url.port}"  # what messages may show

    def __repr__(self) -> str:
        return f"WebhookSink({self.target}, signed={self._secret is not None})"

    @classmethod
    def from_options(cls, options: dict[str, Any], common: SinkConfig) -> Self:
        cls.check_keys(options, common)
        url = check_hook_url(required_str(options, common, "url", "an http(s) URL"), common)
        secret = None
        secret_env = optional_str(options, common, "secret_env", "the name of an environment variable")
        if secret_env is not None:
            value = os.environ.get(secret_env, "")
            if not value:
                raise UsageError(
                    f"{common.where('secret_env')}: environment variable {secret_env} is not set "
                    "(it must hold the webhook signing secret)"
                )
            secret = Secret(value)
        headers = optional_str_map(options, common, "headers")
        for name, value in headers.items():
            if name.lower() in _RESERVED_HEADERS:
                raise common.error("headers", "headers other than the ones execmon sets itself", name)
            if _SENSITIVE_HEADER.search(name):
                register_secret(value)
        return cls(
            url,
            secret=secret,
            headers=headers,
            concurrency=optional_int(options, common, "concurrency", 4, 1),
            timeout_s=common.timeout_s,
        )

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            headers={"User-Agent": f"execmon/{__version__}"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers_for(self, record: dict[str, Any], body: bytes) -> dict[str, str]:
        headers = {**self._headers, "Content-Type": "application/json"}
        headers["Idempotency-Key"] = str(record.get("event_id", ""))
        if self._secret is not None:
            digest = hmac.new(self._secret.reveal().encode(), body, hashlib.sha256).hexdigest()
            headers["X-Execmon-Signature"] = f"sha256={digest}"
        return headers

    async def send(self, record: dict[str, Any]) -> None:
        if self._session is None:
            raise DeliveryError("the webhook sink is not open")
        body = encode_record(record)
        try:
            async with self._session.post(
                self._url, data=body, headers=self.headers_for(record, body), allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return
                snippet = await _snippet(resp)
                raise self._status_error(resp, snippet)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            detail = redact(str(exc)) or "no detail"
            raise DeliveryError(f"POST to {self.target} failed: {type(exc).__name__}: {detail}") from None

    def _status_error(self, resp: aiohttp.ClientResponse, snippet: str) -> DeliveryError:
        status = resp.status
        said = f": {snippet}" if snippet else ""
        if status in RETRYABLE_STATUS or status >= 500:
            wait = parse_retry_after(resp.headers.get("Retry-After"), time.time(), RETRY_AFTER_CAP_S)
            return DeliveryError(f"HTTP {status} from {self.target}{said}", retry_after_s=wait)
        return DeliveryError(f"HTTP {status} from {self.target} (not retried){said}", retryable=False)


def check_hook_url(raw: str, common: SinkConfig) -> URL:
    """An absolute http(s) URL with a host, or a UsageError that does not print the URL's path."""
    try:
        url = URL(raw)
    except (TypeError, ValueError):
        raise common.error("url", "an http(s) URL", "a value that is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        shown = f"{url.scheme}://..." if url.scheme else "a URL without a scheme"
        raise UsageError(f"{common.where('url')}: expected an http:// or https:// URL with a host, found {shown}")
    register_secret(raw)
    return url


async def _snippet(resp: aiohttp.ClientResponse) -> str:
    """The start of an error body, one line, for the dead letter's reason."""
    try:
        data = await resp.content.read(_SNIPPET_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return ""
    text = data.decode("utf-8", "replace").replace("\n", " ").replace("\r", " ").strip()
    return redact(text)

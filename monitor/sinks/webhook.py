"""The webhook sink: POST each record as JSON, signed, with its event_id as the Idempotency-Key.

With secrets (`secret_env`, `secret_envs` for rotation) every post is signed twice over:
- Standard Webhooks (standardwebhooks.com): `webhook-id` (the event_id), `webhook-timestamp` (Unix
  seconds of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
  one space-separated signature per secret. A secret `whsec_<base64>` is the spec's form: the key is
  the decoded bytes; any other secret is used as its UTF-8 bytes (the `standardwebhooks` package
  verifies those when given the bytes, not the string, which it would base64-decode);
- `X-Execmon-Signature: sha256=<hex HMAC-SHA256 of the body>` keyed with the first secret's text,
  as before.

2xx: delivered. 408, 429, 5xx, timeouts and connection errors: retried (Retry-After honoured).
Any other status: permanent, a dead letter whose reason carries the status. Redirects are not
followed (a moved hook is a configuration problem). The URL is treated as a secret (chat hook
URLs carry tokens in the path): messages name only its scheme, host and port.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass
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
_RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "idempotency-key",
        "x-execmon-signature",
        "content-length",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
_WHSEC_PREFIX = "whsec_"


@dataclass(frozen=True, slots=True, repr=False)
class SigningSecret:
    """One webhook secret: its text (X-Execmon-Signature's key) and its Standard Webhooks key bytes."""

    text: Secret
    key: bytes

    @classmethod
    def parse(cls, value: str, where: str) -> SigningSecret:
        """`whsec_<base64>` gives the decoded bytes as the key; anything else its UTF-8 bytes."""
        if not value.startswith(_WHSEC_PREFIX):
            return cls(Secret(value), value.encode())
        encoded = value[len(_WHSEC_PREFIX) :]
        try:  # padding is optional, as the spec's own libraries accept it
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not key:
            raise UsageError(f"{where}: a secret starting with {_WHSEC_PREFIX} must be base64 after the prefix")
        return cls(Secret(value), key)


def standard_signature(secrets: list[SigningSecret], msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value: `v1,<base64>` per secret, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(s.key, signed, hashlib.sha256).digest()).decode() for s in secrets
    )


class WebhookSink(BaseSink):
    KEYS = ("url", "secret_env", "secret_envs", "headers", "concurrency")

    def __init__(
        self,
        url: URL,
        *,
        secrets: list[SigningSecret] | None = None,
        headers: dict[str, str] | None = None,
        concurrency: int = 4,
        timeout_s: float = 10.0,
    ) -> None:
        self._url = url
        self._secrets = list(secrets or [])
        self._headers = dict(headers or {})
        self.concurrency = concurrency
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self.target = f"{url.scheme}://{url.host}:{url.port}"  # what messages may show

    def __repr__(self) -> str:
        return f"WebhookSink({self.target}, signed={bool(self._secrets)})"

    @classmethod
    def from_options(cls, options: dict[str, Any], common: SinkConfig) -> Self:
        cls.check_keys(options, common)
        url = check_hook_url(required_str(options, common, "url", "an http(s) URL"), common)
        headers = optional_str_map(options, common, "headers")
        for name, value in headers.items():
            if name.lower() in _RESERVED_HEADERS:
                raise common.error("headers", "headers other than the ones execmon sets itself", name)
            if _SENSITIVE_HEADER.search(name):
                register_secret(value)
        return cls(
            url,
            secrets=_secrets_from(options, common),
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
        event_id = str(record.get("event_id", ""))
        headers["Idempotency-Key"] = event_id
        if self._secrets:
            digest = hmac.new(self._secrets[0].text.reveal().encode(), body, hashlib.sha256).hexdigest()
            headers["X-Execmon-Signature"] = f"sha256={digest}"
            timestamp = int(time.time())  # this attempt's: receivers refuse old ones (replays)
            headers["webhook-id"] = event_id
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = standard_signature(self._secrets, event_id, timestamp, body)
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


def _secrets_from(options: dict[str, Any], common: SinkConfig) -> list[SigningSecret]:
    """The signing secrets, from the variables named by `secret_env` and `secret_envs` (in order)."""
    names: list[tuple[str, str]] = []
    single = optional_str(options, common, "secret_env", "the name of an environment variable")
    if single is not None:
        names.append(("secret_env", single))
    several = options.get("secret_envs", [])
    if not isinstance(several, list) or not all(isinstance(n, str) and n.strip() for n in several):
        raise common.error("secret_envs", "a list of environment variable names", several)
    names += [("secret_envs", name) for name in several]
    secrets: list[SigningSecret] = []
    seen: set[str] = set()
    for key, name in names:
        if name in seen:
            continue  # named twice: one signature is enough
        seen.add(name)
        value = os.environ.get(name, "")
        if not value:
            raise UsageError(
                f"{common.where(key)}: environment variable {name} is not set (it must hold a webhook signing secret)"
            )
        secrets.append(SigningSecret.parse(value, f"{common.where(key)} (variable {name})"))
    return secrets


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

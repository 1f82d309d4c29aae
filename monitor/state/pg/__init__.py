"""State in PostgreSQL, shared by many replicas: schema, store and the shared request budget.

Only `redact_url` and `redact_text` live here (no imports of the modules below, so that any of them,
and the front ends, may use them without an import cycle): a URL or a driver's message never
shows a password in a log or an error.
"""

from __future__ import annotations

import contextlib
import re
from urllib.parse import unquote, urlsplit

_MASK = "***"
# key=value conninfo ("host=db password=secret") and a URL's query (?password=secret).
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL (or key=value conninfo) with its password replaced by ***; the rest as given."""
    if "://" in url:
        try:
            netloc = urlsplit(url).netloc
        except ValueError:  # not even a URL: keep nothing that might be a secret
            return "<an unparsable PostgreSQL URL>"
        userinfo, at, hosts = netloc.rpartition("@")  # the last @: a password may hold an unescaped one
        if at and ":" in userinfo:
            url = url.replace(netloc, f"{userinfo.partition(':')[0]}:{_MASK}@{hosts}", 1)
    return _CONNINFO_PASSWORD.sub(rf"\1{_MASK}", url)


def redact_text(text: str, url: str) -> str:
    """`text` (a driver's message, which may quote the URL) without the URL's password anywhere."""
    text = text.replace(url, redact_url(url))
    for secret in _passwords(url):
        text = text.replace(secret, _MASK)
    return _CONNINFO_PASSWORD.sub(rf"\1{_MASK}", text)


def _passwords(url: str) -> set[str]:
    """The password as written in `url` and decoded (libpq may quote either)."""
    found: set[str] = set()
    if "://" in url:
        with contextlib.suppress(ValueError):
            userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
            if at and ":" in userinfo:
                raw = userinfo.partition(":")[2]
                found |= {raw, unquote(raw)}
    for match in _CONNINFO_PASSWORD.finditer(url):
        raw = match.group(2)
        found |= {raw, unquote(raw), raw.strip("'")}
    return {secret for secret in found if len(secret) >= 3}  # never mask every "a" of a message


__all__ = ["redact_text", "redact_url"]

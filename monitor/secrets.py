"""Secrets (API keys, control tokens, webhook secrets): never in a repr, a log line or an error.

Every secret the process learns is registered here; the logging pipeline redacts registered
values wherever they appear (see `monitor.logs`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

_lock = threading.Lock()
_known: set[str] = set()
REDACTED = "[REDACTED]"


class Secret:
    """A string that does not show itself. Call `reveal()` only where the value is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register_secret(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('[REDACTED]')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def register_secret(value: str) -> None:
    """Remember a secret value so that log redaction can find it (values under 4 chars are ignored)."""
    if len(value) >= 4:
        with _lock:
            _known.add(value)


def redact(text: str) -> str:
    """Replace every registered secret inside `text`."""
    with _lock:
        known = tuple(_known)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of an environment without the variables that hold a known secret (for child processes:
    a hook script has no business with the API key or the control token)."""
    with _lock:
        known = set(_known)
    return {name: value for name, value in env.items() if value.strip() not in known}

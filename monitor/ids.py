"""Execution IDs: validated against an allowlist before they go anywhere near a URL.

The vendor page does not say which characters an ID may hold, and an ID becomes one URL path
segment: yarl's `/` does not stop `..` or `/` from escaping the path, and percent-encoding does
not stop `.`/`..` either. So only a conservative alphabet is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TextIO

from monitor.errors import UsageError

MAX_ID_LENGTH = 128
_ALLOWED = re.compile(r"[A-Za-z0-9_-]{1,128}")
ALLOWED_DESCRIPTION = "letters, digits, '_' and '-', 1 to 128 characters (e.g. exec_1a2b3c4d5e6f)"


class InvalidExecutionId(UsageError, ValueError):
    """An ID outside the allowlist. The message names it (shortened) and says what is allowed."""

    def __init__(self, raw: str) -> None:
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        super().__init__(f"invalid execution ID {shown!r}: allowed are {ALLOWED_DESCRIPTION}")
        self.raw = raw


def is_valid_execution_id(raw: str) -> bool:
    return _ALLOWED.fullmatch(raw) is not None


def validate_execution_id(raw: str) -> str:
    """Return the ID unchanged, or raise InvalidExecutionId."""
    if not isinstance(raw, str) or not is_valid_execution_id(raw):
        raise InvalidExecutionId(str(raw))
    return raw


def ids_from_arguments(args: Iterable[str], stdin: TextIO) -> list[str]:
    """IDs as given on a command line, `-` meaning one per line from stdin (blank lines and
    # comments skipped). Not validated: each command decides what an invalid one means."""
    ids: list[str] = []
    for arg in args:
        if arg == "-":
            lines = (line.strip() for line in stdin)
            ids.extend(line for line in lines if line and not line.startswith("#"))
        else:
            ids.append(arg)
    return ids

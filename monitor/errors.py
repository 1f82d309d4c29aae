"""Errors that end a command with a clear one-line message (never a traceback)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: a flag, a config value, an ID. The CLI prints it and exits 2."""

    exit_code = 2


class KeyRejectedExit(Exception):
    """The API key was rejected (401): `execmon watch` exits 3."""

    exit_code = 3

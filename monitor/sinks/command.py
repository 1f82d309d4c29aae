"""The command sink: run a program per record, the record as JSON on its standard input.

The program gets EXECMON_EVENT_ID, EXECMON_EVENT_KIND, EXECMON_EXECUTION_ID, EXECMON_OUTCOME
(and EXECMON_GROUP) in its environment. Exit status 0 means delivered; anything else, or
running out of time, is retried (the whole process group is killed first). No shell unless the
configuration says `shell = true`.

The child does not inherit the daemon's environment (a key can hide in any variable): it gets
PATH, HOME, LANG, LC_*, TZ, the variables `env` names (`env = ["NAME", ...]`) or sets
(`env = {NAME = "value"}`), and the EXECMON_* record variables. A passed variable that holds
execmon's own API key or a token is still left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from monitor.config import SinkConfig
from monitor.errors import UsageError
from monitor.secrets import redact, without_secrets
from monitor.sinks.base import (
    BaseSink,
    DeliveryError,
    encode_record,
    optional_bool,
    optional_int,
    optional_str_map,
)

STDERR_TAIL_BYTES = 2000
_PIPE_GRACE_S = 1.0  # after exit, how long to wait for a stderr held open by a leftover child
PASSED_ENV = ("PATH", "HOME", "LANG", "TZ")  # and every LC_*: what a program needs to run and format
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CommandSink(BaseSink):
    KEYS = ("command", "shell", "env", "concurrency")

    def __init__(
        self,
        argv: list[str] | None = None,
        *,
        shell_command: str | None = None,
        env: dict[str, str] | None = None,
        pass_env: tuple[str, ...] = (),
        concurrency: int = 1,
    ) -> None:
        if (argv is None) == (shell_command is None):
            raise ValueError("give either argv or shell_command")
        self._argv = argv
        self._shell_command = shell_command
        self._env = dict(env or {})
        self._pass_env = frozenset(pass_env)
        self.concurrency = concurrency
        self.program = argv[0] if argv else "sh"

    @classmethod
    def from_options(cls, options: dict[str, Any], common: SinkConfig) -> Self:
        cls.check_keys(options, common)
        raw = options.get("command")
        shell = optional_bool(options, common, "shell", False)
        env, pass_env = _env_option(options, common)
        concurrency = optional_int(options, common, "concurrency", 1, 1)
        if shell:
            if not isinstance(raw, str) or not raw.strip():
                raise common.error("command", "a command line (text) when shell = true", raw)
            return cls(shell_command=raw, env=env, pass_env=pass_env, concurrency=concurrency)
        argv = _argv(raw, common)
        argv[0] = _resolve_program(argv[0], common)
        return cls(argv, env=env, pass_env=pass_env, concurrency=concurrency)

    async def send(self, record: dict[str, Any]) -> None:
        env = {**self._inherited(os.environ), **self._env, **record_env(record)}
        try:
            proc = await self._spawn(env)
        except OSError as exc:
            raise DeliveryError(f"cannot start {self.program}: {exc.strerror or exc}") from None
        try:
            tail = await _feed_and_wait(proc, encode_record(record) + b"\n")
        except BaseException:  # a timeout (cancellation) included: never leave the process behind
            await _kill(proc)
            raise
        if proc.returncode != 0:
            said = f": {tail}" if tail else ""
            raise DeliveryError(f"{self.program} {_how_it_ended(proc.returncode)}{said}")

    def _inherited(self, parent: Mapping[str, str]) -> dict[str, str]:
        """The allowlisted part of the daemon's environment, never one holding execmon's own secrets."""
        allowed = {
            name: value
            for name, value in parent.items()
            if name in PASSED_ENV or name.startswith("LC_") or name in self._pass_env
        }
        return without_secrets(allowed)

    async def _spawn(self, env: dict[str, str]) -> asyncio.subprocess.Process:
        pipes: dict[str, Any] = {
            "stdin": asyncio.subprocess.PIPE,
            "stdout": asyncio.subprocess.DEVNULL,
            "stderr": asyncio.subprocess.PIPE,
            "env": env,
            "start_new_session": True,  # its own process group, so a kill reaches its children
        }
        if self._shell_command is not None:
            return await asyncio.create_subprocess_shell(self._shell_command, **pipes)
        assert self._argv is not None
        return await asyncio.create_subprocess_exec(*self._argv, **pipes)


def record_env(record: dict[str, Any]) -> dict[str, str]:
    """The variables that tell the program what it got without parsing stdin."""
    return {
        "EXECMON_EVENT_ID": str(record.get("event_id") or ""),
        "EXECMON_EVENT_KIND": str(record.get("kind") or "execution"),
        "EXECMON_EXECUTION_ID": str(record.get("execution_id") or ""),
        "EXECMON_OUTCOME": str(record.get("outcome") or ""),
        "EXECMON_GROUP": str(record.get("group") or ""),
    }


def _env_option(options: Mapping[str, Any], common: SinkConfig) -> tuple[dict[str, str], tuple[str, ...]]:
    """`env`: a list of variable names passed through from the daemon, or a table of values to set."""
    raw = options.get("env")
    if not isinstance(raw, list):
        return optional_str_map(options, common, "env"), ()
    if not all(isinstance(name, str) and _ENV_NAME.fullmatch(name) for name in raw):
        raise common.error("env", "a list of environment variable names (or a table of values)", raw)
    return {}, tuple(raw)


def _argv(raw: object, common: SinkConfig) -> list[str]:
    if isinstance(raw, str):
        try:
            argv = shlex.split(raw)
        except ValueError as exc:
            raise common.error("command", f"a command line shlex can split ({exc})", raw) from None
    elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
        argv = list(raw)
    else:
        raise common.error("command", "a command line or a list of arguments", raw)
    if not argv or not argv[0]:
        raise common.error("command", "a program to run", raw)
    return argv


def _resolve_program(program: str, common: SinkConfig) -> str:
    """The program's path, checked at start: a missing program is a usage error, not 10 retries."""
    if os.sep in program:
        path = Path(program).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise UsageError(f"{common.where('command')}: program {program!r} does not exist or is not executable")
    found = shutil.which(program)
    if found is None:
        raise UsageError(f"{common.where('command')}: program {program!r} not found on PATH")
    return found


async def _feed_and_wait(proc: asyncio.subprocess.Process, data: bytes) -> str:
    """Write stdin, close it, keep the tail of stderr, wait for the exit; returns the stderr tail."""
    assert proc.stdin is not None
    assert proc.stderr is not None
    reader = asyncio.ensure_future(_tail(proc.stderr))
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(data)
            await proc.stdin.drain()
        proc.stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await proc.stdin.wait_closed()
        await proc.wait()
        done, _ = await asyncio.wait({reader}, timeout=_PIPE_GRACE_S)
        return reader.result() if done else ""
    finally:
        reader.cancel()


async def _tail(stream: asyncio.StreamReader) -> str:
    chunks: deque[bytes] = deque()
    size = 0
    while chunk := await stream.read(4096):
        chunks.append(chunk)
        size += len(chunk)
        while size - len(chunks[0]) >= STDERR_TAIL_BYTES:
            size -= len(chunks.popleft())
    text = b"".join(chunks)[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")
    return redact(" ".join(text.split()))


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await asyncio.shield(proc.wait())


def _how_it_ended(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"

"""The `execmon` command line: one sub-command per module in `monitor.commands`.

Each command module provides `HELP: str`, `add_arguments(parser)` and `run(args) -> int`.
Every error execmon raises derives from `ExecmonError`; `exit_status` is the one place that maps
them to exit statuses (the contract's list), and each becomes one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from monitor import __version__
from monitor.control_client import NotTracked
from monitor.errors import ExecmonError, KeyRejectedError, MonitorFailed, StoreFault, UsageError

EXIT_USAGE, EXIT_KEY_REJECTED, EXIT_INTERRUPTED = 2, 3, 130
EXIT_FAILED_RESTARTABLE = 1  # the daemon: a supervisor restarts it
EXIT_WATCH_CANNOT_GO_ON = 4  # watch: the same command run again resumes

COMMANDS = ("watch", "run", "add", "ls", "status", "rm", "dead-letters", "simulate", "bench")


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"monitor.commands.{name.replace('-', '_')}")


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (argparse's default) and no usage dump for type errors."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that sub-command's module is imported (a faster start)."""
    parser = _Parser(prog="execmon", description="Watch remote executions on a rate-limited API.")
    parser.add_argument("--version", action="version", version=f"execmon {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        module = _load(name)
        sub = subs.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    first = words[0] if words else None
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(words)
    try:
        code: int = args._module.run(args)
    except ExecmonError as exc:
        print(f"execmon {args.command}: {exc}{_cause(exc)}", file=sys.stderr)
        return exit_status(exc, args.command)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


def exit_status(exc: ExecmonError, command: str) -> int:
    """The contract's exit status for an error that ended `command`."""
    if isinstance(exc, NotTracked):
        return 1  # like `rm` of a missing file
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, KeyRejectedError):
        return EXIT_KEY_REJECTED
    if isinstance(exc, MonitorFailed | StoreFault) and command == "watch":
        return EXIT_WATCH_CANNOT_GO_ON
    return EXIT_FAILED_RESTARTABLE


def _cause(exc: BaseException) -> str:
    """The chained cause of a MonitorFailed, on the same line."""
    cause = exc.__cause__
    if not isinstance(exc, MonitorFailed) or cause is None:
        return ""
    return f": {type(cause).__name__}: {cause}"

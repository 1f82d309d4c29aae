"""The `execmon` command line: one sub-command per module in `monitor.commands`.

Each command module provides `HELP: str`, `add_arguments(parser)` and `run(args) -> int`.
Errors meant for the user (`UsageError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from monitor import __version__
from monitor.errors import UsageError

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
    except UsageError as exc:
        print(f"execmon {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code

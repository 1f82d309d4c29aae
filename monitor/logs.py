"""Logging: structlog for everything, stdlib records (aiohttp's, ...) rendered by the same pipeline.

JSON lines when the stream is not a terminal, the console renderer when it is. Every line passes a
redaction processor (registered secrets, see `monitor.secrets`) after exception formatting and
before rendering, so no secret reaches a line whatever the logging call passed.

As a library execmon is quiet: modules log through `get_logger(__name__)`, which prints nothing and
configures nothing. Until structlog is configured (by `configure_logging`, by the application, or by
`structlog.testing.capture_logs`), each event becomes one record on the stdlib logger of that name,
under `monitor`, which has only a `NullHandler`: it shows wherever the application's logging
configuration shows records, and nowhere otherwise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from monitor.errors import UsageError
from monitor.secrets import redact

LIBRARY_LOGGER = "monitor"  # the parent of every logger execmon creates
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")
_HANDLER_MARK = "_execmon_handler"
_PLAIN = (str, int, float, bool, type(None))
_MAX_DEPTH = 32


def redact_value(value: object, _depth: int = 0) -> object:
    """`value` with every registered secret replaced, looking into dicts, lists and tuples.

    Other objects (and structures nested deeper than a sane log line) are kept as they are unless
    their repr, which is what a renderer prints, holds a secret; then the redacted repr replaces them.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PLAIN):
        return value
    if _depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {_redact_key(k): redact_value(v, _depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [redact_value(v, _depth + 1) for v in value]
    try:
        shown = repr(value)
    except RecursionError:  # a structure that contains itself
        return f"<unprintable {type(value).__name__}>"
    cleaned = redact(shown)
    return value if cleaned == shown else cleaned


def _redact_key(key: object) -> object:
    """Keys stay keys; ones JSON cannot hold (tuples, objects) become their redacted str."""
    if isinstance(key, _PLAIN):
        return redact(key) if isinstance(key, str) else key
    return redact(str(key))


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact every value (event text and formatted exception included)."""
    return {key: redact_value(value) for key, value in event_dict.items()}


class LibraryLogger:
    """What `get_logger` returns: structlog's calling style, quiet until the application asks.

    Once structlog is configured, an event goes through that configuration, as it would through
    `structlog.get_logger(name)`. Before that, it becomes a record on `logging.getLogger(name)`
    (the event, then key=value pairs, redacted, and a traceback below them), built only when that
    logger is enabled for the level, so a debug line on the poll path costs two checks.
    """

    __slots__ = ("_configured", "_context", "_name", "_stdlib")

    def __init__(self, name: str, context: Mapping[str, Any] | None = None) -> None:
        self._name = name
        self._context = dict(context or {})
        self._stdlib = logging.getLogger(name)
        # Lazy: it reads the global configuration on each call, so a later configure() applies.
        self._configured: Any = structlog.get_logger(name, **self._context)

    @property
    def name(self) -> str:
        return self._name

    def bind(self, **fields: Any) -> LibraryLogger:
        """A logger that adds `fields` to every event (as structlog's `bind`)."""
        return LibraryLogger(self._name, {**self._context, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, "error", event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._log(logging.CRITICAL, "critical", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the exception being handled (its traceback, redacted)."""
        self._log(logging.ERROR, "exception", event, fields)

    def _log(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(self._configured, method)(event, **fields)
            return
        if not self._stdlib.isEnabledFor(level):  # the stdlib caches this answer per logger
            return
        if method == "exception":
            fields.setdefault("exc_info", True)
        stack_info = bool(fields.pop("stack_info", False))
        message = _message(event, {**structlog.contextvars.get_contextvars(), **self._context, **fields})
        # stacklevel 3: the record names the module that logged, not this class.
        self._stdlib.log(level, message, stack_info=stack_info, stacklevel=3)


def get_logger(name: str) -> LibraryLogger:
    """The logger every execmon module uses: `log = get_logger(__name__)`. See `LibraryLogger`."""
    return LibraryLogger(name)


def _message(event: str, fields: dict[str, Any]) -> str:
    """`event k=v ...` with every secret redacted; a formatted traceback on the lines below."""
    formatted = structlog.processors.format_exc_info(None, "", {"event": event, **fields})
    clean = redact_secrets(None, "", formatted)
    trace = clean.pop("exception", None)
    text = " ".join([str(clean.pop("event")), *(f"{key}={_shown(value)}" for key, value in clean.items())])
    return text if trace is None else f"{text}\n{trace}"


def _shown(value: object) -> str:
    """A value as the console renderer shows it: plain words bare, anything else as its repr."""
    if isinstance(value, str) and value and not any(c.isspace() or c in "=\"'" for c in value):
        return value
    return repr(value)


def check_level(level: str) -> str:
    """The level name in lower case, or UsageError listing the valid ones."""
    name = str(level).strip().lower()
    if name == "warn":
        name = "warning"
    if name not in LEVELS:
        raise UsageError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    return name


def check_format(fmt: str) -> str:
    name = str(fmt).strip().lower()
    if name not in FORMATS:
        raise UsageError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    return name


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _pre_chain() -> list[Processor]:
    """What every record gets before formatting, structlog's and stdlib's alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(fmt: str, stream: TextIO) -> Processor:
    if fmt == "auto":
        fmt = "console" if _is_terminal(stream) else "json"
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    # Tracebacks were already formatted (and redacted) as text: print them plainly, no rich locals.
    return structlog.dev.ConsoleRenderer(colors=_is_terminal(stream), exception_formatter=structlog.dev.plain_traceback)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and stdlib logging to write to `stream` (default: stderr). Safe to call again."""
    level_name = check_level(level)
    fmt_name = check_format(fmt)
    out = sys.stderr if stream is None else stream
    numeric = getattr(logging, level_name.upper())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,  # after the traceback is text, before anything is rendered
            _renderer(fmt_name, out),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    _remove_handlers(root)
    root.addHandler(handler)
    root.setLevel(numeric)
    structlog.configure(
        # Redacted here too, so that any other handler on the root logger gets clean records.
        processors=[
            *_pre_chain(),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        context_class=dict,
        # Not cached: a later configure_logging() or structlog.testing.capture_logs() must apply
        # to loggers that modules created at import time.
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo configure_logging (for tests and embedders): structlog defaults, our handler removed."""
    root = logging.getLogger()
    _remove_handlers(root)
    root.setLevel(logging.WARNING)  # the stdlib default
    structlog.reset_defaults()


def _remove_handlers(root: logging.Logger) -> None:
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()

"""The logging pipeline: redaction before rendering, JSON on a pipe, console on a terminal; and the
library logger (`get_logger`), quiet until the application configures logging."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from monitor.errors import UsageError
from monitor.logs import check_level, configure_logging, get_logger, redact_value, reset_logging
from monitor.secrets import REDACTED, Secret

SECRET = "sk_test_logs_9f8e7d6c5b4a"


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    Secret(SECRET)  # registered, as every Secret is on creation
    yield
    reset_logging()
    structlog.contextvars.clear_contextvars()


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _configured(level: str = "debug", fmt: str = "json") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, fmt=fmt, stream=stream)
    return stream


def test_secret_in_the_event_is_redacted() -> None:
    stream = _configured()
    structlog.get_logger("t").info(f"using key {SECRET} now")
    [line] = _json_lines(stream.getvalue())
    assert line["event"] == f"using key {REDACTED} now"
    assert SECRET not in stream.getvalue()


def test_secret_in_nested_values_is_redacted() -> None:
    stream = _configured()
    structlog.get_logger("t").warning(
        "request",
        headers={"X-API-Key": SECRET, "deep": [{"k": (SECRET, 1)}]},
        plain=SECRET,
        obj=ValueError(f"bad {SECRET}"),
        count=3,
    )
    [line] = _json_lines(stream.getvalue())
    assert SECRET not in stream.getvalue()
    assert line["headers"] == {"X-API-Key": REDACTED, "deep": [{"k": [REDACTED, 1]}]}
    assert line["plain"] == REDACTED
    assert line["obj"] == f"ValueError('bad {REDACTED}')"
    assert line["count"] == 3


def test_secret_in_an_exception_traceback_is_redacted() -> None:
    stream = _configured()
    try:
        raise RuntimeError(f"the server refused {SECRET}")
    except RuntimeError:
        structlog.get_logger("t").exception("poll crashed")
    [line] = _json_lines(stream.getvalue())
    assert "RuntimeError: the server refused [REDACTED]" in line["exception"]
    assert "Traceback" in line["exception"]
    assert SECRET not in stream.getvalue()


def test_stdlib_records_are_rendered_by_the_same_pipeline_and_redacted() -> None:
    stream = _configured()
    std = logging.getLogger("aiohttp.client")
    std.warning("header was %s", SECRET)
    try:
        raise OSError(f"reset while sending {SECRET}")
    except OSError:
        std.exception("transport failed")
    first, second = _json_lines(stream.getvalue())
    assert first == {
        **first,
        "event": f"header was {REDACTED}",
        "level": "warning",
        "logger": "aiohttp.client",
    }
    assert "OSError: reset while sending [REDACTED]" in second["exception"]
    assert SECRET not in stream.getvalue()


def test_console_renderer_is_redacted_too() -> None:
    stream = _configured(fmt="console")
    log = structlog.get_logger("t")
    log.info("key", value=SECRET)
    try:
        raise RuntimeError(SECRET)
    except RuntimeError:
        log.exception("boom")
    text = stream.getvalue()
    assert "value=[REDACTED]" in text
    assert "RuntimeError: [REDACTED]" in text
    assert SECRET not in text


def test_secret_created_after_configuration_is_redacted() -> None:
    stream = _configured()
    late = "late_secret_value_123"
    structlog.get_logger("t").info("before", v=late)
    Secret(late)
    structlog.get_logger("t").info("after", v=late)
    before, after = _json_lines(stream.getvalue())
    assert before["v"] == late  # not a secret yet: nothing is redacted blindly
    assert after["v"] == REDACTED


def test_json_lines_on_a_pipe_with_iso_utc_timestamps_level_and_context() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r") as reader, os.fdopen(write_fd, "w") as writer:
        configure_logging("info", fmt="auto", stream=writer)
        structlog.contextvars.bind_contextvars(execution_id="exec_1")
        structlog.get_logger("monitor.x").info("polled", progress=45)
        writer.close()  # end of file for the reader
        text = reader.read()
    [line] = _json_lines(text)
    assert line["event"] == "polled"
    assert line["level"] == "info"
    assert line["logger"] == "monitor.x"
    assert line["execution_id"] == "exec_1"
    assert line["progress"] == 45
    assert line["timestamp"].endswith("Z")
    assert line["timestamp"][10] == "T"


def test_console_renderer_on_a_terminal() -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        configure_logging("info", fmt="auto", stream=terminal)
        structlog.get_logger("t").info("hello terminal", n=1)
        terminal.flush()
        text = os.read(master, 65536).decode()
    os.close(master)
    assert "hello terminal" in text
    assert "\x1b[" in text  # colours, on a terminal only
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_default_stream_is_stderr_at_call_time(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    structlog.get_logger("t").info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _json_lines(captured.err)[0]["event"] == "to stderr"  # not a terminal: JSON


def test_level_filters_structlog_and_stdlib() -> None:
    stream = _configured(level="warning")
    structlog.get_logger("t").info("dropped")
    logging.getLogger("aiohttp.access").info("dropped too")
    structlog.get_logger("t").warning("kept")
    logging.getLogger("aiohttp.server").error("kept too")
    assert [line["event"] for line in _json_lines(stream.getvalue())] == ["kept", "kept too"]


def test_configuring_twice_replaces_rather_than_duplicates() -> None:
    first = _configured()
    second = _configured(level="info")
    structlog.get_logger("t").info("once")
    structlog.get_logger("t").debug("now filtered")
    assert first.getvalue() == ""
    assert [line["event"] for line in _json_lines(second.getvalue())] == ["once"]
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_execmon_handler", False)]
    assert len(ours) == 1


def test_logger_created_before_configuration_follows_it() -> None:
    early = structlog.get_logger("early")
    stream = _configured()
    early.info("late config applies")
    assert _json_lines(stream.getvalue())[0]["event"] == "late config applies"


def test_capture_logs_still_works_after_configuration() -> None:
    _configured()
    with structlog.testing.capture_logs() as logs:
        structlog.get_logger("t").info("captured", k=1)
    assert logs == [{"event": "captured", "k": 1, "log_level": "info"}]


@pytest.mark.parametrize(("given", "expected"), [("DEBUG", "debug"), ("Warn", "warning"), (" error ", "error")])
def test_level_names_are_normalised(given: str, expected: str) -> None:
    assert check_level(given) == expected


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "auto"), ("", "auto"), ("info", "xml")])
def test_bad_level_or_format_is_a_usage_error(level: str, fmt: str) -> None:
    with pytest.raises(UsageError) as info:
        configure_logging(level, fmt=fmt)
    assert "one of" in str(info.value)


def test_redact_value_keeps_plain_values_and_objects_without_secrets() -> None:
    marker = object()
    assert redact_value(marker) is marker
    assert redact_value(None) is None
    assert redact_value(2.5) == 2.5
    assert redact_value({SECRET: 1}) == {REDACTED: 1}


def test_redaction_survives_odd_structures() -> None:
    loop: list[Any] = [SECRET]
    loop.append(loop)
    deep: Any = SECRET
    for _ in range(100):
        deep = [deep]
    stream = _configured()
    structlog.get_logger("t").info("odd", loop=loop, deep=deep, keys={(1, 2): SECRET, SECRET: 1})
    text = stream.getvalue()
    assert SECRET not in text
    assert _json_lines(text)[0]["event"] == "odd"


def test_records_reaching_other_stdlib_handlers_are_redacted_too(caplog: pytest.LogCaptureFixture) -> None:
    _configured()
    try:
        raise RuntimeError(SECRET)
    except RuntimeError:
        structlog.get_logger("t").exception("seen by caplog", key=SECRET)
    assert caplog.records
    assert SECRET not in caplog.text
    assert all(SECRET not in str(record.msg) for record in caplog.records)


# --- the library logger: quiet until the application configures logging ----------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def monitor_records() -> Iterator[list[logging.LogRecord]]:
    """What an application's handler on the `monitor` logger (at debug) receives."""
    handler = _Collect()
    parent = logging.getLogger("monitor")
    level = parent.level
    parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    yield handler.records
    parent.removeHandler(handler)
    parent.setLevel(level)


class _CountsRepr:
    def __init__(self) -> None:
        self.calls = 0

    def __repr__(self) -> str:
        self.calls += 1
        return "counted"


def test_library_logger_prints_nothing_without_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("monitor.quiet")
    log.debug("poll", execution_id="exec_1")
    log.info("info")
    log.warning("warning")
    log.error("error", key=SECRET)
    log.critical("critical")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("exception")
    assert capsys.readouterr() == ("", "")
    assert not structlog.is_configured()


def test_the_monitor_logger_has_only_a_null_handler() -> None:
    parent = logging.getLogger("monitor")
    assert [type(h) for h in parent.handlers] == [logging.NullHandler]  # no last-resort printing
    assert parent.level == logging.NOTSET  # the application decides
    assert parent.propagate


def test_events_reach_a_handler_on_the_monitor_logger(monitor_records: list[logging.LogRecord]) -> None:
    structlog.contextvars.bind_contextvars(execution_id="exec_1")
    get_logger("monitor.x.y").bind(group="nightly").debug("polled", progress=45, step="two words", key=SECRET)
    [record] = monitor_records
    assert record.name == "monitor.x.y"
    assert record.levelno == logging.DEBUG
    assert (
        record.getMessage() == f"polled execution_id=exec_1 group=nightly progress=45 step='two words' key={REDACTED}"
    )
    assert record.funcName == "test_events_reach_a_handler_on_the_monitor_logger"  # the caller, not the helper
    assert record.pathname == __file__


def test_an_exception_reaches_the_handler_formatted_and_redacted(monitor_records: list[logging.LogRecord]) -> None:
    try:
        raise RuntimeError(f"refused {SECRET}")
    except RuntimeError:
        get_logger("monitor.x").exception("poll crashed", attempt=2)
    [record] = monitor_records
    assert record.levelno == logging.ERROR
    first, *trace = record.getMessage().splitlines()
    assert first == "poll crashed attempt=2"
    assert trace[0] == "Traceback (most recent call last):"
    assert trace[-1] == f"RuntimeError: refused {REDACTED}"
    assert record.exc_info is None  # already text, redacted: a handler cannot print the raw one


def test_disabled_levels_do_no_formatting(monitor_records: list[logging.LogRecord]) -> None:
    logging.getLogger("monitor").setLevel(logging.INFO)
    value = _CountsRepr()
    log = get_logger("monitor.x")
    log.debug("skipped", value=value)
    assert (monitor_records, value.calls) == ([], 0)
    log.info("kept", value=value)
    assert [r.getMessage() for r in monitor_records] == ["kept value=counted"]


def test_configure_logging_takes_over_and_reset_makes_it_quiet_again(capsys: pytest.CaptureFixture[str]) -> None:
    early = get_logger("monitor.x")  # made at import time, as modules do
    stream = _configured(level="info")
    early.debug("filtered")
    early.info("polled", n=1)
    [line] = _json_lines(stream.getvalue())
    assert line == {**line, "event": "polled", "n": 1, "logger": "monitor.x", "level": "info"}
    reset_logging()
    early.error("after reset")
    assert capsys.readouterr() == ("", "")
    assert "after reset" not in stream.getvalue()


def test_capture_logs_sees_library_logger_events() -> None:
    log = get_logger("monitor.x")
    with structlog.testing.capture_logs() as logs:
        log.bind(group="g").debug("captured", k=1)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("crashed")
    assert logs == [
        {"event": "captured", "group": "g", "k": 1, "log_level": "debug"},
        {"event": "crashed", "exc_info": True, "log_level": "error"},
    ]


def test_quiet_lines_are_plain_text(monitor_records: list[logging.LogRecord]) -> None:
    log = get_logger("monitor.x")
    log.info("values", empty="", quoted='say "hi"', eq="a=b", none=None, nested={"k": [1, 2]})
    log.info("stack", stack_info=True)
    values, stack = monitor_records
    assert values.getMessage() == """values empty='' quoted='say "hi"' eq='a=b' none=None nested={'k': [1, 2]}"""
    assert stack.getMessage() == "stack"
    assert stack.stack_info is not None
    assert "test_quiet_lines_are_plain_text" in stack.stack_info

"""The notify sink: one short human message per record, to chat and mail, through Apprise.

`urls` are in Apprise's own forms (slack://, mailto://, discord://, msteams://, json://, ...), checked
at start; `url_envs` names environment variables that hold more, for a config file without secrets.
They carry tokens and passwords, so they are secrets: errors and logs name only their schemes.
Each record becomes one line (`monitor.sinks.notify_text`) sent to every URL at once; Apprise
answering False (some URL failed) is a retryable DeliveryError, so the record is tried
again for all of them (at-least-once: a URL that had it may show it twice).

Throttling: at most `max_per_minute` messages in any sliding minute. Past it, records are folded
into one summary ("and 14 more: 12 completed, 2 failed"), sent as soon as the minute frees a slot
(so the summary itself stays within the limit). A folded record's `send()` waits for its summary:
it returns once the summary was sent, and raises for every folded record when it failed, so that
each is retried. Nothing is marked delivered before the message that stands for it went out. That
wait is why the sink declares `hold_s` (the engine adds it to `timeout_s`) and many workers
(`concurrency`): each folded record holds one until its summary is out, and records beyond that
wait in the outbox for the next minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import apprise

from monitor.config import ConfigError, SinkConfig
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.secrets import register_secret
from monitor.sinks.base import BaseSink, DeliveryError, optional_int, optional_str
from monitor.sinks.notify_text import message, summary

log = get_logger(__name__)

DEFAULT_MAX_PER_MINUTE = 6
FOLD_CAPACITY = 200  # records one summary can hold at once (each holds a worker while it waits)
_HOLD_MARGIN_S = 1.0  # the summary goes out a hair after its slot frees; timers wake a little late
_EXPIRY_SLACK_S = 1e-3  # a timer may fire a clock tick early: the slot it waited for counts as free


@dataclass(eq=False, slots=True)
class _Fold:
    """Records past the limit, waiting for the summary that `task` sends when a slot frees."""

    records: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class NotifySink(BaseSink):
    KEYS = ("urls", "url_envs", "max_per_minute", "title")
    WINDOW_S: ClassVar[float] = 60.0  # the throttle's sliding minute (tests shorten it)
    concurrency = FOLD_CAPACITY

    def __init__(
        self,
        urls: Sequence[str],
        *,
        origins: Sequence[str] = (),  # where each URL came from, for errors (default: "notify sink URL #n")
        max_per_minute: int = DEFAULT_MAX_PER_MINUTE,
        title: str = "",
        timeout_s: float = 10.0,
        window_s: float | None = None,  # None: WINDOW_S
    ) -> None:
        named = list(origins) or [f"notify sink URL #{n}" for n in range(1, len(urls) + 1)]
        services = [_service(url, origin) for url, origin in zip(urls, named, strict=True)]
        if not services:
            raise ConfigError("notify sink: expected at least one Apprise URL, found none")
        self.schemes = sorted({_scheme(url) for url in urls})
        self.target = ", ".join(f"{s}://" for s in self.schemes)  # what messages may show
        self._apprise = apprise.Apprise()
        for service in services:
            self._apprise.add(service)
        self._max = max_per_minute
        self._title = title
        self._timeout_s = timeout_s
        self._window_s = self.WINDOW_S if window_s is None else window_s
        self.hold_s = self._window_s + _HOLD_MARGIN_S  # how long a folded record may wait for its summary
        self._sent: deque[float] = deque()  # loop times of the messages in the current window
        self._fold: _Fold | None = None

    def __repr__(self) -> str:
        return f"NotifySink({self.target}, max_per_minute={self._max})"

    @classmethod
    def from_options(cls, options: dict[str, Any], common: SinkConfig) -> Self:
        cls.check_keys(options, common)
        urls, origins = _urls(options, common)
        return cls(
            urls,
            origins=origins,
            max_per_minute=optional_int(options, common, "max_per_minute", DEFAULT_MAX_PER_MINUTE, 1),
            title=optional_str(options, common, "title", "a non-empty title") or "",
            timeout_s=common.timeout_s,
        )

    async def close(self) -> None:
        fold, self._fold = self._fold, None
        if fold is not None and fold.task is not None:  # its records stay pending in the outbox
            fold.task.cancel()
            await asyncio.gather(fold.task, return_exceptions=True)

    async def send(self, record: dict[str, Any]) -> None:
        now = asyncio.get_running_loop().time()
        self._expire(now)
        if self._fold is None and len(self._sent) < self._max:
            self._sent.append(now)
            await self._notify(*message(record))
            return
        await self._wait_in_fold(record, now)

    # -- folding -----------------------------------------------------------------------------

    async def _wait_in_fold(self, record: dict[str, Any], now: float) -> None:
        """Join this minute's fold and return once its summary was sent (DeliveryError if it failed)."""
        fold = self._fold
        if fold is None:
            fold = self._fold = _Fold()
            first_free = self._sent[0] + self._window_s  # the window is full: its oldest message leaves first
            fold.task = asyncio.create_task(self._flush(fold, first_free - now), name="execmon-notify-summary")
            fold.task.add_done_callback(_retrieve)
            log.info("past max_per_minute: folding records into one summary", sink=self.name, max=self._max)
        task = fold.task
        assert task is not None
        fold.records.append(record)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # this attempt gave up (timeout, stop): the summary no longer stands for it
                fold.records = [r for r in fold.records if r is not record]
            elif task.cancelled() and not _cancelling():  # the sink closed, abandoning the summary
                raise DeliveryError("the sink closed before the summary was sent") from None
            raise
        except DeliveryError as exc:
            reason = f"the summary of folded records failed: {exc.reason}"
            raise DeliveryError(reason, retry_after_s=exc.retry_after_s) from None

    async def _flush(self, fold: _Fold, delay_s: float) -> None:
        await asyncio.sleep(max(0.0, delay_s))
        self._fold = None  # records from now on see the slot this summary takes, and fold anew
        records = list(fold.records)
        if not records:
            return  # every folded attempt gave up: nothing to stand for
        now = asyncio.get_running_loop().time()
        self._expire(now)
        self._sent.append(now)
        await self._notify(*(message(records[0]) if len(records) == 1 else summary(records)))
        log.info("sent the summary of folded records", sink=self.name, records=len(records))

    def _expire(self, now: float) -> None:
        while self._sent and self._sent[0] + self._window_s <= now + _EXPIRY_SLACK_S:
            self._sent.popleft()

    # -- Apprise -----------------------------------------------------------------------------

    async def _notify(self, text: str, level: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._apprise.async_notify(
                    body=text, title=self._title, notify_type=apprise.NotifyType(level)
                )
        except TimeoutError:
            raise DeliveryError(f"no answer from {self.target} within {self._timeout_s:g} s") from None
        if not answer:
            raise DeliveryError(f"Apprise could not notify every URL ({self.target}); its log lines say why")


# -- URLs ----------------------------------------------------------------------------------------

_parsing: contextvars.ContextVar[bool] = contextvars.ContextVar("execmon_apprise_parsing", default=False)


class _QuietWhileParsing(logging.Filter):
    """Apprise logs an URL it cannot parse, secrets and all; ours says what is wrong without them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _parsing.get()


_APPRISE_LOGGER = logging.getLogger("apprise")
if not any(isinstance(f, _QuietWhileParsing) for f in _APPRISE_LOGGER.filters):
    _APPRISE_LOGGER.addFilter(_QuietWhileParsing())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    token = _parsing.set(True)
    try:
        yield
    finally:
        _parsing.reset(token)


def _urls(options: dict[str, Any], common: SinkConfig) -> tuple[list[str], list[str]]:
    """The URLs written in `urls`, then those held by the variables `url_envs` names, and where each came from."""
    written, names = options.get("urls", []), options.get("url_envs", [])
    if not isinstance(written, list) or not all(isinstance(u, str) and u.strip() for u in written):
        raise common.error("urls", "a list of Apprise URLs (slack://..., mailto://..., json://...)", "another value")
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise common.error("url_envs", "a list of environment variable names", names)
    if not written and not names:
        raise common.error("urls", "a list of Apprise URLs (or url_envs: variables that hold them)", None)
    origins = [f"{common.where('urls')}: item {n}" for n in range(1, len(written) + 1)]
    for name in names:
        value = os.environ.get(name, "").strip()
        if not value:
            raise UsageError(f"{common.where('url_envs')}: environment variable {name} is not set (an Apprise URL)")
        written = [*written, value]
        origins.append(f"{common.where('url_envs')}: variable {name}")
    return written, origins


def _service(url: str, origin: str) -> apprise.NotifyBase:
    register_secret(url)  # redacted wherever a log line would show it whole
    with _quiet():
        service = apprise.Apprise.instantiate(url)
    if service is None:
        raise ConfigError(
            f"{origin} (a {_scheme(url)}:// URL) is not one Apprise can use; "
            "see Apprise's documentation for that service's URL form"
        )
    return service


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep and scheme.isascii() and scheme.isalnum() else "?"


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _retrieve(task: asyncio.Task[None]) -> None:
    """The folded attempts read the summary's outcome; if none is left to, it is not an error."""
    if not task.cancelled():
        task.exception()

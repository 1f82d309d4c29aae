"""A virtual-time asyncio event loop: hours of a scenario in seconds, with real loopback sockets.

`VirtualTimeLoop` is a `SelectorEventLoop` whose `time()` is a number it moves itself. Whenever the
loop would block, it first polls its sockets without waiting; if nothing is ready (loopback I/O
inside one process is ready as soon as the other side wrote), it jumps the clock straight to the
next timer instead of sleeping. So the real scheduler, the real aiohttp client and the real
simulator, served on 127.0.0.1 in the same loop, run at CPU speed while every `asyncio.sleep`,
`call_at`, aiohttp timeout and aiolimiter delay behaves exactly as on real time.

Two details keep it honest:
- every loop iteration that finds no I/O costs `tick_s` (1 µs) of virtual time, as a real iteration
  costs real time; without it, code that reschedules itself for "now + 1e-17" (float leftovers, e.g.
  in a leaky bucket) would spin forever at one instant;
- while work runs in a thread (`run_in_executor`, `asyncio.to_thread`, `getaddrinfo`), the clock does
  not jump: the loop waits in real time for the thread, whose work takes no virtual time.

It does not work with a server in another thread or process (their time is real).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_START = 100_000.0  # an arbitrary origin; not 0, so that no code mistakes it for "unset"
DEFAULT_TICK_S = 1e-6
_THREAD_POLL_S = 0.05  # real seconds to wait at a time for a thread to finish


class _VirtualSelector(selectors.DefaultSelector):
    """The platform selector, except that waiting means moving the virtual clock."""

    def __init__(self, start: float, tick_s: float) -> None:
        super().__init__()
        self.now = start
        self.tick_s = tick_s
        self.threads_pending = 0
        self.jumps = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events:
            return events
        if self.threads_pending:
            # A thread will call back soon: wait for it in real time, keep virtual time still.
            return super().select(0 if timeout == 0 else _THREAD_POLL_S)
        if timeout is None:
            # No timer at all: only another thread or a signal can wake us, in real time.
            return super().select(None)
        if timeout > 0:
            self.jumps += 1
        self.now += max(timeout, self.tick_s)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring)."""

    def __init__(self, start: float = DEFAULT_START, tick_s: float = DEFAULT_TICK_S) -> None:
        self._virtual = _VirtualSelector(start, tick_s)
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now

    @property
    def jumps(self) -> int:
        """How many times the clock jumped to a timer (for tests and curiosity)."""
        return self._virtual.jumps

    def run_in_executor(  # type: ignore[override]  # same signature, narrower generic spelling
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[..., T],
        *args: Any,
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._virtual.threads_pending += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _future: asyncio.Future[Any]) -> None:
        self._virtual.threads_pending -= 1


def run(main: Coroutine[Any, Any, T], *, start: float = DEFAULT_START, debug: bool | None = None) -> T:
    """Like `asyncio.run(main)`, on a fresh VirtualTimeLoop."""
    with asyncio.Runner(debug=debug, loop_factory=lambda: VirtualTimeLoop(start)) as runner:
        return runner.run(main)

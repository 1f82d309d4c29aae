"""execmon: watch many remote executions on a rate-limited API and deliver every result.

The Python API (see the README, "Use it from Python"):

    from monitor import Monitor
    async with Monitor(base_url=url, api_key=key) as mon:
        await mon.track(ids)
        done = await mon.wait(ids)

`Monitor` and `Result` are imported on first use, so that `import monitor` (and the `execmon`
command's start) stays light.
"""

import logging
from typing import TYPE_CHECKING, Any

from monitor._version import __version__
from monitor.errors import ExecmonError, KeyRejectedError, MonitorFailed
from monitor.records import Outcome

if TYPE_CHECKING:
    from monitor.engine import Monitor
    from monitor.results import Result

# A library configures no logging: records go to the `monitor` logger and show only where the
# application sends them. The NullHandler keeps Python's last-resort handler from printing them.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ExecmonError",
    "KeyRejectedError",
    "Monitor",
    "MonitorFailed",
    "Outcome",
    "Result",
    "__version__",
]

_LAZY = {"Monitor": "monitor.engine", "Result": "monitor.results"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib  # noqa: PLC0415 - only when the heavy part is asked for

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")

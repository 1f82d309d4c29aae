"""A library is quiet: importing execmon and using `Monitor` print nothing and configure no logging.

Each check runs in a fresh interpreter, where nothing (pytest included) has configured logging yet,
so Python's last-resort handler would print any warning that reached a logger without handlers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import monitor

# Takes a snapshot of global logging state; `unchanged()` asserts nothing altered it.
PRELUDE = """
import logging, structlog

def snapshot():
    root = logging.getLogger()
    return (list(root.handlers), root.level, structlog.is_configured(), structlog.get_config(),
            logging.getLoggerClass(), logging.root.manager.disable)

BEFORE = snapshot()

def unchanged():
    assert snapshot() == BEFORE, (BEFORE, snapshot())
    assert logging.NullHandler in {type(h) for h in logging.getLogger("monitor").handlers}
"""

IMPORT_EVERY_MODULE = """
import importlib, pkgutil
import monitor
for info in pkgutil.walk_packages(monitor.__path__, "monitor."):
    if info.name != "monitor.__main__":  # that one runs the CLI
        importlib.import_module(info.name)
unchanged()
"""

USE_THE_MONITOR = """
import asyncio
import monitor.testing
from monitor import KeyRejectedError, Monitor, Outcome

async def main():
    async with monitor.testing.simulator(rate_limit="30/3s") as sim:
        ids = await sim.create(count=3, duration_s=0.3, outcome="completed")
        ids += await sim.create(count=1, duration_s=0.3, outcome="failed")
        async with Monitor(base_url=sim.url, api_key=sim.api_key, rate_limit="30/3s") as mon:
            await mon.track(ids)
            seen = [r.execution_id async for r in mon.results(ids)]
            done = await mon.wait(ids, timeout=30)
        assert sorted(seen) == sorted(ids) == sorted(done)
        assert sorted(r.outcome for r in done.values()) == ["completed"] * 3 + ["failed"]
        # A rejected key: the library logs warnings and errors, still printed nowhere.
        async with Monitor(base_url=sim.url, api_key="sk_test_not_this_one", rate_limit="30/3s") as mon:
            await mon.track(ids[:1])
            try:
                await mon.wait(ids[:1], timeout=30)
            except KeyRejectedError:
                pass
            else:
                raise AssertionError("a wrong key was accepted")
    # A server stricter than the Monitor's budget: 429s (logged as warnings), and a wait that times out.
    async with monitor.testing.simulator(rate_limit="1/60s") as strict:
        ids = await strict.create(count=2, duration_s=60)
        async with Monitor(base_url=strict.url, api_key=strict.api_key, rate_limit="30/3s") as mon:
            await mon.track(ids)
            for _ in range(400):
                if strict.stats()["responses"]["429"]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no 429 in 20 s")
            try:
                await mon.wait(ids, timeout=0.1)
            except TimeoutError:
                pass
            else:
                raise AssertionError("60 s executions have ended")

asyncio.run(main())
unchanged()
"""

# The application opts in: a handler on the `monitor` logger sees the library's records.
OPT_IN = """
records = []
class Collect(logging.Handler):
    def emit(self, record):
        records.append(record)
logging.getLogger("monitor").addHandler(Collect())
logging.getLogger("monitor").setLevel(logging.DEBUG)
BEFORE = snapshot()
"""
CHECK_RECORDS = """
names = {r.name for r in records}
assert records and all(n.startswith("monitor.") for n in names), names
messages = [r.getMessage() for r in records]
assert any(r.levelno == logging.DEBUG for r in records)
assert any(r.levelno == logging.INFO for r in records)
assert any("status_code=401" in m for m in messages)  # the rejected key
assert any("status_code=429" in m for m in messages)  # the strict server
assert all("sk_test_not_this_one" not in m for m in messages)
"""


def run_script(*parts: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECMON_")}
    script = "\n".join(textwrap.dedent(part) for part in parts)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=env, check=False
    )


def assert_quiet_success(done: subprocess.CompletedProcess[str]) -> None:
    assert done.stderr == "", done.stderr  # a traceback (a failed check) shows here in full
    assert done.stdout == ""
    assert done.returncode == 0


def test_every_module_logs_through_the_library_logger() -> None:
    """`structlog.get_logger` prints on stdout while structlog is unconfigured; `monitor.logs.get_logger`
    does not. Only monitor.logs itself may call structlog's."""
    package = Path(monitor.__file__).parent
    offenders = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if path.name != "logs.py" and "structlog.get_logger(" in path.read_text()
    ]
    assert offenders == []


def test_importing_every_module_configures_nothing() -> None:
    done = run_script(PRELUDE, IMPORT_EVERY_MODULE)
    assert_quiet_success(done)


@pytest.mark.slow
def test_tracking_executions_to_the_end_prints_nothing() -> None:
    done = run_script(PRELUDE, USE_THE_MONITOR)
    assert_quiet_success(done)


@pytest.mark.slow
def test_an_application_handler_on_the_monitor_logger_gets_the_records() -> None:
    done = run_script(PRELUDE, OPT_IN, USE_THE_MONITOR, CHECK_RECORDS)
    assert_quiet_success(done)

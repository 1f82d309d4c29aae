"""The cost of the core: the Monitor's polls per second against a bare aiohttp loop, no rate limit.

    .venv/bin/python benchmarks/core_overhead.py [--executions 200] [--concurrency 16] [--seconds 5] [--rounds 2]

Serves `execmon simulate --port 0 --rate-limit none` in a subprocess (so the simulator's CPU counts
against neither side), creates N executions that outlast the run, then measures, one after the
other for the same wall time, --rounds times over (bare, Monitor, bare, Monitor, ...):
- bare: C workers sharing one aiohttp ClientSession, each doing GET .../{id}/status with the key
  header round robin over the IDs and reading the body; nothing else;
- monitor: `Monitor(config=...)` with `[polling] max_in_flight = C`, `policy = "backoff"` with a
  tiny initial_interval_s and backoff_factor 1 (every execution always due), `rate_limit = "none"`
  and SQLite state in a temporary file (poll bookkeeping flushed in batches, as in production).
Both rates come from the same source, the simulator's `requests_total` (GET /_sim/stats) before and
after a measured window that starts after a short warm-up, and the CPU each side used (a share
well below 100 % means something else on the machine took the cores: run it again). Prints every
figure and the ratio of the best round of each (the one least disturbed by other work); exits 1 when
Monitor/bare is below --min-ratio (0.5). A benchmark, not a test: nothing times it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from monitor import Monitor
from monitor.config import load_config
from monitor.secrets import Secret

KEY = "sk_bench_overhead"
STATUS = "/api/v1/executions/{}/status"


@dataclass(frozen=True, slots=True)
class Figure:
    approach: str
    requests: int
    seconds: float
    client_cpu_s: float  # CPU time of this process (the side measured) over the window
    simulator_cpu_s: float | None  # the simulator's, where /proc tells

    def cpu_share(self, cpu_s: float | None) -> str:
        return "-" if cpu_s is None or self.seconds <= 0 else f"{100 * cpu_s / self.seconds:.0f}%"

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@contextlib.asynccontextmanager
async def simulator_process() -> AsyncIterator[tuple[str, int]]:
    """`execmon simulate` on a free port, no rate limit; yields its base URL and pid."""
    argv = [sys.executable, "-m", "monitor", "simulate", "--port", "0", "--rate-limit", "none"]
    argv += ["--api-key", KEY, "--log-level", "warning"]
    process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the simulator did not start: {line!r}")
        yield line.removeprefix("listening on "), process.pid
    finally:
        if process.returncode is None:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=10)
        if process.returncode is None:
            process.kill()
            await process.wait()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def requests_total(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(f"{url}/_sim/stats") as resp:
        resp.raise_for_status()
        return int((await resp.json())["requests_total"])


async def create_executions(session: aiohttp.ClientSession, url: str, count: int, duration_s: float) -> list[str]:
    async with session.post(f"{url}/_sim/executions", json={"count": count, "duration_s": duration_s}) as resp:
        resp.raise_for_status()
        return list((await resp.json())["execution_ids"])


@dataclass(frozen=True, slots=True)
class Setup:
    """What both approaches share: the simulator, its IDs, the concurrency and the timing."""

    admin: aiohttp.ClientSession  # for /_sim/stats
    url: str
    simulator_pid: int
    ids: list[str]
    concurrency: int
    warmup_s: float
    seconds: float

    async def measure(self, approach: str) -> Callable[[], Awaitable[Figure]]:
        """Wait out the warm-up, note the count; the returned call waits `seconds` and gives the figure."""
        await asyncio.sleep(self.warmup_s)
        before = await requests_total(self.admin, self.url)
        started, cpu, sim_cpu = time.perf_counter(), time.process_time(), process_cpu_s(self.simulator_pid)

        async def finish() -> Figure:
            await asyncio.sleep(self.seconds)
            after = await requests_total(self.admin, self.url)
            ended, cpu_after, sim_after = time.perf_counter(), time.process_time(), process_cpu_s(self.simulator_pid)
            sim_used = None if sim_cpu is None or sim_after is None else sim_after - sim_cpu
            return Figure(approach, after - before, ended - started, cpu_after - cpu, sim_used)

        return finish


async def run_bare(setup: Setup) -> Figure:
    targets = itertools.cycle([setup.url + STATUS.format(i) for i in setup.ids])
    headers = {"X-API-Key": KEY, "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=setup.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while True:
                async with session.get(next(targets), headers=headers) as resp:
                    await resp.read()

        workers = [asyncio.create_task(worker()) for _ in range(setup.concurrency)]
        try:
            finish = await setup.measure("bare aiohttp loop")
            figure = await finish()
            for task in workers:
                if task.done():
                    task.result()  # a worker that died is a broken benchmark: say so
            return figure
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


async def run_monitor(setup: Setup, state: Path) -> Figure:
    interval = "0.001"  # seconds: with backoff_factor 1, every execution is due again at once
    config = load_config(
        None,
        env={},
        overrides={
            "api.base_url": setup.url,
            "api.rate_limit": "none",
            "api.max_connections": str(setup.concurrency),
            "polling.policy": "backoff",
            "polling.max_in_flight": str(setup.concurrency),
            "polling.initial_interval_s": interval,
            "polling.backoff_factor": "1",
            "polling.max_interval_s": interval,
        },
    )
    config = replace(config, env_api_key=Secret(KEY))
    async with Monitor(config=config, state=state) as mon:
        await mon.track(setup.ids)
        finish = await setup.measure("Monitor (SQLite state)")
        figure = await finish()
        if mon.failure is not None:
            raise mon.failure
        polls = mon.budget.requests
    if polls < figure.requests:
        raise RuntimeError(f"the simulator counted {figure.requests} requests, the Monitor made only {polls}")
    return figure


async def main_async(args: argparse.Namespace) -> list[Figure]:
    async with simulator_process() as (url, pid), aiohttp.ClientSession() as admin:
        duration = 100.0 * (args.warmup + args.seconds) * (args.rounds * 2 + 1)  # outlasts the run
        ids = await create_executions(admin, url, args.executions, duration)
        setup = Setup(admin, url, pid, ids, args.concurrency, args.warmup, args.seconds)
        figures = []
        with tempfile.TemporaryDirectory(prefix="execmon-overhead-") as tmp:
            for round_ in range(args.rounds):
                figures.append(await run_bare(setup))
                figures.append(await run_monitor(setup, Path(tmp) / f"state-{round_}.db"))
        return figures


def report(figures: list[Figure], args: argparse.Namespace) -> float:
    """Print the table and the ratio (the best round of each approach); return the ratio."""
    print(
        f"the cost of the core: {args.executions} executions, concurrency {args.concurrency}, "
        f"{args.seconds:g} s each after {args.warmup:g} s warm-up, no rate limit, simulator in a subprocess"
    )
    print(f"{'approach':<24}  {'requests':>9}  {'seconds':>8}  {'polls/s':>9}  {'its CPU':>8}  {'sim CPU':>8}")
    for f in figures:
        cpu, sim = f.cpu_share(f.client_cpu_s), f.cpu_share(f.simulator_cpu_s)
        print(f"{f.approach:<24}  {f.requests:>9,}  {f.seconds:>8.2f}  {f.per_s:>9,.0f}  {cpu:>8}  {sim:>8}")
    bare = max(f.per_s for f in figures if f.approach.startswith("bare"))
    monitor = max(f.per_s for f in figures if f.approach.startswith("Monitor"))
    ratio = monitor / bare if bare > 0 else 0.0
    verdict = "ok" if ratio >= args.min_ratio else f"BELOW {args.min_ratio:g}x"
    print(f"ratio Monitor/bare: {ratio:.2f}x ({verdict}; best round of each, target >= {args.min_ratio:g}x)")
    flags = f"--executions {args.executions} --concurrency {args.concurrency} --seconds {args.seconds:g}"
    flags += f" --rounds {args.rounds}"
    print(f"reproduce: make overhead, or .venv/bin/python benchmarks/core_overhead.py {flags}")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--executions", type=int, default=200, help="executions polled (default 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight, both sides (default 16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured wall time per round (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="bare then Monitor, this many times (default 2)")
    parser.add_argument("--min-ratio", type=float, default=0.5, help="exit 1 below this Monitor/bare ratio")
    args = parser.parse_args()
    if min(args.executions, args.concurrency, args.rounds) < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--executions, --concurrency and --rounds must be >= 1, --seconds > 0, --warmup >= 0")
    figures = asyncio.run(main_async(args))
    return 0 if report(figures, args) >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())

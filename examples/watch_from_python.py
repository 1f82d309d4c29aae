"""Watch executions from Python: track them with `Monitor`, print each result as it ends.

Offline (a local simulator, in this process, creates the executions):

    python examples/watch_from_python.py

Against your API, with IDs you already have:

    EXECMON_BASE_URL=https://api.example.com EXECMON_API_KEY=sk_... \\
        python examples/watch_from_python.py exec_1 exec_2 exec_3
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter

import monitor.testing
from monitor import Monitor


async def watch(base_url: str, api_key: str, ids: list[str], rate_limit: str) -> None:
    async with Monitor(base_url=base_url, api_key=api_key, rate_limit=rate_limit) as mon:
        await mon.track(ids, labels={"source": "example"})
        async for result in mon.results(ids):  # in the order they end
            print(f"{result.execution_id} ended: {result.outcome}")
        done = await mon.wait(ids, timeout=3600)  # all have ended: returns at once
    counts = Counter(str(result.outcome) for result in done.values())
    print(f"{len(done)} executions ended:", ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))


async def main() -> None:
    base_url = os.environ.get("EXECMON_BASE_URL")
    if base_url:
        rate_limit = os.environ.get("EXECMON_RATE_LIMIT", "30/60s")  # your key's limit
        await watch(base_url, os.environ["EXECMON_API_KEY"], sys.argv[1:], rate_limit)
        return
    async with monitor.testing.simulator(rate_limit="30/3s") as sim:
        ids = await sim.create(count=3, duration_s=1.0, outcome="completed")
        ids += await sim.create(count=1, duration_s=1.5, outcome="failed")
        ids += await sim.create(count=1, duration_s=2.0, outcome="cancelled")
        await watch(sim.url, sim.api_key, ids, rate_limit="30/3s")


if __name__ == "__main__":
    asyncio.run(main())

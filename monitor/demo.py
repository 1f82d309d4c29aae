"""`make demo`: the simulator, 200 executions, and `execmon watch` with its live view, in about a minute.

The budget is scaled to 30 requests per 3 s (the real API allows 30 per 60 s) so that the demo
fits in two minutes; everything else is the product as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RATE = "30/3s"
KEY = "sk_test_demo"
# (count, duration in seconds, outcome or None for the default mix)
BATCHES = [(40, 8, None), (40, 15, None), (40, 25, None), (40, 35, None), (30, 45, None), (10, 20, "failed")]


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(  # noqa: S310 - a loopback URL this script built
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        result: dict[str, object] = json.loads(answer.read())
        return result


def _get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback
        result: dict[str, object] = json.loads(answer.read())
        return result


def _start_simulator() -> tuple[subprocess.Popen[str], str]:
    sim = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "monitor", "simulate", "--port", "0", "--api-key", KEY, "--rate-limit", RATE],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert sim.stdout is not None
    line = sim.stdout.readline().strip()
    if not line.startswith("listening on "):
        sim.kill()
        raise SystemExit(f"demo: the simulator did not start ({line!r})")
    return sim, line.removeprefix("listening on ")


def main() -> int:
    sim, url = _start_simulator()
    try:
        ids: list[str] = []
        for count, duration, outcome in BATCHES:
            body: dict[str, object] = {"count": count, "duration_s": duration}
            if outcome:
                body["outcome"] = outcome
            created = _post(url + "/_sim/executions", body)["execution_ids"]
            assert isinstance(created, list)
            ids += [str(i) for i in created]
        print(f"demo: simulator at {url} (budget {RATE}), {len(ids)} executions created; watching...\n")
        with tempfile.TemporaryDirectory(prefix="execmon-demo-") as tmp:
            results = Path(tmp) / "results.jsonl"
            started = time.monotonic()
            env = {**os.environ, "EXECMON_API_KEY": KEY}
            watch = subprocess.run(  # noqa: S603 - our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "monitor",
                    "watch",
                    "-",
                    "--base-url",
                    url,
                    "--rate-limit",
                    RATE,
                    "--sink",
                    f"jsonl:{results}",
                ],
                input="\n".join(ids),
                text=True,
                env=env,
                check=False,
            )
            took = time.monotonic() - started
            lines = results.read_text().splitlines() if results.exists() else []
        stats = _get(url + "/_sim/stats")
        responses = stats["responses"]
        assert isinstance(responses, dict)
        print(
            f"\ndemo: watch exited {watch.returncode} after {took:.0f} s; {len(lines)} result records written;"
            f" server saw {stats['requests_total']} requests, {responses.get('429', 0)} answered 429,"
            f" at most {stats['max_requests_in_window']} in any 3 s window (limit 30)."
        )
        print("demo: exit status 1 is expected: some executions failed or were cancelled, as in real life.")
        return 0 if len(lines) == len(ids) else 1
    finally:
        sim.terminate()
        sim.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())

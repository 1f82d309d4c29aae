"""`execmon watch --state` killed with SIGKILL at random moments, resumed, and redelivered from scratch.

What must hold: exactly one line per execution in the jsonl file with the simulator's outcome,
the budget held at the server across every restart, and one watch per state file at a time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import (
    RATE,
    Sim,
    WatchProc,
    assert_delivered_once,
    by_id,
    count_lines,
    read_jsonl,
    sim_args,
    wait_for_lines,
    wait_until,
    watch,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


def test_killed_eight_times_then_resumed_delivers_each_result_once(sim: Sim, tmp_path: Path) -> None:
    ids: list[str] = []
    for duration in (3, 6, 9, 12, 15):
        ids += sim.create(10, duration_s=duration, outcome="completed")
    failed = sim.create(5, duration_s=8, outcome="failed")
    ids += failed
    out, state = tmp_path / "out.jsonl", tmp_path / "state.db"
    args = [*sim_args(sim), "-", "--state", str(state), "--sink", f"jsonl:{out}", "--quiet"]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = []
    for attempt in range(8):
        with WatchProc(args, tmp=tmp_path, ids=ids) as proc:
            before = count_lines(out)
            if attempt % 2:  # right after a result line lands in the file
                wait_for_lines(out, before + 1, 6)
            else:  # at a random moment
                time.sleep(rng.uniform(0.3, 2.5))
            alive = proc.running()
            proc.kill()
        kills.append((count_lines(out), alive))
        by_id(read_jsonl(out))  # after every kill: whole lines only, no execution twice
    assert any(alive for _, alive in kills), f"every run had ended before its kill: {kills}"
    assert kills[-1][0] > 0, f"nothing was delivered before the last kill (seed {seed}): {kills}"

    final = watch(args, tmp=tmp_path, ids=ids, timeout_s=45)
    assert final.rc == 1, f"{final}\nkills (lines, alive): {kills}, seed {seed}"  # five failed
    assert_delivered_once(sim, read_jsonl(out), ids)
    assert {r["execution_id"] for r in read_jsonl(out) if r["outcome"] == "failed"} == set(failed)
    sim.assert_budget_held()

    # The state is lost: a fresh state file redelivers everything; the jsonl sink must drop it all.
    again = watch(
        [*sim_args(sim), "-", "--state", str(tmp_path / "state2.db"), "--sink", f"jsonl:{out}", "--quiet"],
        tmp=tmp_path,
        ids=ids,
        timeout_s=30,
    )
    assert again.rc == 1, again
    assert len(read_jsonl(out)) == len(ids)
    assert_delivered_once(sim, read_jsonl(out), ids)
    sim.assert_budget_held()


def test_a_second_watch_on_the_same_state_file_refuses_to_start(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(3, duration_s=60, outcome="completed")
    state = tmp_path / "state.db"
    args = [*sim_args(sim), "--state", str(state), "--sink", f"jsonl:{tmp_path / 'out.jsonl'}", "--quiet", *ids]
    with WatchProc(args, tmp=tmp_path, name="first") as first:
        assert wait_until(lambda: sim.stats()["requests_total"] >= 1, 15), first.result(-1)
        second = watch(args, tmp=tmp_path, name="second", timeout_s=20)
        assert second.rc == 2, second
        assert second.stderr.count("\n") == 1, second
        assert "Traceback" not in second.stderr
        assert str(state) in second.stderr, second
        assert "in use" in second.stderr.lower() or "already" in second.stderr.lower(), second
        assert first.running(), "the first watch must go on"


def test_a_resumed_watch_reports_results_delivered_by_an_earlier_run(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(4, duration_s=1, outcome="completed") + sim.create(1, duration_s=1, outcome="failed")
    out, state = tmp_path / "out.jsonl", tmp_path / "state.db"
    args = [*sim_args(sim), "--state", str(state), "--sink", f"jsonl:{out}", "--quiet", *ids]
    first = watch(args, tmp=tmp_path, timeout_s=30)
    assert first.rc == 1, first
    polls = sim.stats()["requests_total"]
    second = watch(args, tmp=tmp_path, timeout_s=30)
    assert second.rc == 1, second  # the failure delivered earlier still decides the exit status
    assert sim.stats()["requests_total"] == polls  # nothing left to poll
    assert len(read_jsonl(out)) == 5
    assert_delivered_once(sim, read_jsonl(out), ids)

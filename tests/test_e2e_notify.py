"""The notify sink end to end: `execmon watch --config` with `type = "notify"` against the simulator,
through real Apprise (`json://`) to a receiver on loopback (tests/e2e.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import RATE, Sim, WebhookReceiver, read_jsonl, watch, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


def test_watch_sends_one_message_per_result_and_one_for_the_group(sim: Sim, tmp_path: Path) -> None:
    completed = sim.create(4, duration_s=2, outcome="completed")
    failed = sim.create(2, duration_s=3, outcome="failed")
    ids = completed + failed
    out = tmp_path / "out.jsonl"
    with WebhookReceiver() as hook:
        apprise_url = hook.url.replace("http://", "json://", 1)
        config = write_config(
            tmp_path / "c.toml",
            sim,
            [
                {"type": "jsonl", "path": str(out)},
                {"type": "notify", "urls": [apprise_url], "events": ["execution", "group"], "max_per_minute": 20},
            ],
        )
        result = watch(["-", "--config", str(config), "--group", "nightly", "--quiet"], tmp=tmp_path, ids=ids)
        posts = hook.snapshot()
    assert result.rc == 1, result  # two failed
    assert len(read_jsonl(out)) == len(ids)
    assert [p.status for p in posts] == [200] * (len(ids) + 1), "one message per result, one digest, no retries"
    texts = [str(json.loads(p.body)["message"]) for p in posts]
    digests = [t for t in texts if t.startswith("nightly:")]
    texts = [t for t in texts if t not in digests]
    assert digests == [f"nightly: 4 completed, 2 did not (2 failed) — failed: {', '.join(sorted(failed))}"]
    by_id = {text.split(" ", 1)[0]: text for text in texts}
    assert sorted(by_id) == sorted(ids)
    for execution_id in completed:
        assert by_id[execution_id].startswith(f"{execution_id} completed after ")
        assert by_id[execution_id].endswith(" (group nightly)")
    for execution_id in failed:
        assert by_id[execution_id].startswith(f"{execution_id} failed after ")
        assert "(group nightly): Task execution failed: Simulated failure after" in by_id[execution_id]
    assert apprise_url not in result.stderr


def test_a_burst_past_max_per_minute_is_folded_into_one_summary(sim: Sim, tmp_path: Path) -> None:
    """A real watch process, a real minute: 2 messages at once, the other 4 results in one summary."""
    ids = sim.create(6, duration_s=2, outcome="completed")
    with WebhookReceiver() as hook:
        apprise_url = hook.url.replace("http://", "json://", 1)
        config = write_config(
            tmp_path / "c.toml", sim, [{"type": "notify", "urls": [apprise_url], "max_per_minute": 2}]
        )
        result = watch(["-", "--config", str(config), "--quiet"], tmp=tmp_path, ids=ids, timeout_s=120)
        posts = hook.snapshot()
    assert result.rc == 0, result
    texts = [str(json.loads(p.body)["message"]) for p in posts]
    assert len(texts) == 3, texts  # never more than 2 in a minute, then one summary for the rest
    singles, summary = texts[:2], texts[2]
    assert all(t.split(" ", 1)[0] in ids for t in singles)
    assert summary.startswith("and 4 more: 4 completed"), summary
    assert posts[2].at - posts[0].at >= 59.0, "the summary came inside the first minute"

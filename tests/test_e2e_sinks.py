"""Sinks end to end: a failing or hanging webhook beside a jsonl file, group digests, start-up errors.

The webhook receiver is a real aiohttp server on loopback (tests/e2e.py) that verifies the
HMAC signature of every post and records its Idempotency-Key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import (
    RATE,
    Sim,
    WatchProc,
    WebhookReceiver,
    assert_delivered_once,
    count_lines,
    iso_seconds,
    read_jsonl,
    sim_args,
    wait_until,
    watch,
    write_config,
)

pytestmark = pytest.mark.slow

SECRET = "e2e-hook-secret-5521"
FAST_RETRIES = {"backoff_base_s": 0.2, "backoff_cap_s": 1.0}


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


def test_a_failing_webhook_gets_everything_and_does_not_hold_up_the_jsonl_sink(sim: Sim, tmp_path: Path) -> None:
    completed = sim.create(15, duration_s=2, outcome="completed")
    failed = sim.create(5, duration_s=2, outcome="failed")
    ids = completed + failed
    out = tmp_path / "out.jsonl"
    with WebhookReceiver(secret=SECRET, fail_first=6, hang_first=2, hang_s=8) as hook:
        config = write_config(
            tmp_path / "c.toml",
            sim,
            [
                {"type": "jsonl", "path": str(out)},
                {"type": "webhook", "url": hook.url, "secret_env": "EXECMON_WEBHOOK_SECRET", **FAST_RETRIES},
            ],
        )
        env = {"EXECMON_WEBHOOK_SECRET": SECRET}
        with WatchProc(["-", "--config", str(config), "--quiet"], tmp=tmp_path, ids=ids, env=env) as proc:
            assert wait_until(lambda: count_lines(out) >= len(ids), 15), proc.result(-1)
            jsonl_full_at = time.time()
            result = proc.wait(45)
        posts = hook.snapshot()
        accepted = hook.accepted_by_key()  # each Idempotency-Key accepted once
    assert result.rc == 1, result  # five failed
    assert_delivered_once(sim, read_jsonl(out), ids)
    hung = [p for p in posts if p.number <= 2]
    assert len(hung) == 2
    assert all(p.answered_at is not None and jsonl_full_at < p.answered_at for p in hung), (
        "the jsonl sink got its lines only after the webhook stopped hanging"
    )
    assert all(p.signature_ok for p in posts), [p.headers for p in posts if not p.signature_ok]
    assert len(posts) > len(ids)  # the failures were retried
    records = {key: post.record() for key, post in accepted.items()}
    assert all(record["event_id"] == key for key, record in records.items())
    assert sorted(r["execution_id"] for r in records.values()) == sorted(ids)
    truth = sim.truth()
    assert all(r["outcome"] == truth[r["execution_id"]]["status"] for r in records.values())
    assert SECRET not in result.stderr


def test_a_webhook_that_hangs_forever_is_dead_lettered_and_the_watch_ends(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(5, duration_s=2, outcome="completed")
    out = tmp_path / "out.jsonl"
    with WebhookReceiver(hang_first=1_000_000) as hook:
        config = write_config(
            tmp_path / "c.toml",
            sim,
            [
                {"type": "jsonl", "path": str(out)},
                {"type": "webhook", "url": hook.url, "max_attempts": 2, "timeout_s": 1.0, **FAST_RETRIES},
            ],
        )
        result = watch(["-", "--config", str(config)], tmp=tmp_path, ids=ids, timeout_s=40)
        posts = hook.snapshot()
    assert result.rc == 1, result  # every execution completed, but results were not delivered
    assert "dead" in result.stderr.lower(), result
    assert "Traceback" not in result.stderr
    assert_delivered_once(sim, read_jsonl(out), ids)
    assert 5 <= len(posts) <= 10, f"{len(posts)} posts for 5 records at 2 attempts each"
    assert all(p.status == 0 for p in posts)  # none was ever answered


def group_config(tmp_path: Path, sim: Sim, hook: WebhookReceiver, out: Path) -> Path:
    return write_config(
        tmp_path / "c.toml",
        sim,
        [
            {"type": "jsonl", "path": str(out)},
            {"type": "webhook", "url": hook.url, "events": ["group"], **FAST_RETRIES},
        ],
    )


def assert_one_digest(hook: WebhookReceiver, sim: Sim, group: str, ids: list[str], failed: list[str]) -> None:
    posts = hook.snapshot()
    assert len(posts) == 1, [p.record() for p in posts]  # the digest only, no per-execution record
    digest: dict[str, Any] = posts[0].record()
    assert digest["kind"] == "group"
    assert digest["group"] == group
    assert digest["total"] == len(ids)
    assert digest["outcomes"] == {"completed": len(ids) - len(failed), "failed": len(failed)}
    assert sorted(digest["failed_ids"]) == sorted(failed)
    assert posts[0].headers.get("Idempotency-Key") == digest["event_id"]
    truth = sim.truth()
    last_end = max(iso_seconds(truth[i]["ended_at"]) for i in ids)
    assert posts[0].at >= last_end - 0.05, "the digest came before the last member ended"
    assert iso_seconds(digest["last_finished_at"]) >= last_end - 1.0


def create_group(sim: Sim) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    for duration in (2, 3, 4, 5, 6, 7, 8, 9):
        ids += sim.create(3, duration_s=duration, outcome="completed")
    failed = sim.create(4, duration_s=4, outcome="failed") + sim.create(2, duration_s=9, outcome="failed")
    return ids + failed, failed


def test_a_group_gets_one_digest_after_its_last_member_ends(sim: Sim, tmp_path: Path) -> None:
    ids, failed = create_group(sim)
    assert len(ids) == 30
    out = tmp_path / "out.jsonl"
    with WebhookReceiver() as hook:
        config = group_config(tmp_path, sim, hook, out)
        result = watch(["-", "--config", str(config), "--group", "nightly-e2e", "--quiet"], tmp=tmp_path, ids=ids)
        assert result.rc == 1, result
        assert_one_digest(hook, sim, "nightly-e2e", ids, failed)
    records = read_jsonl(out)
    assert_delivered_once(sim, records, ids)
    assert {r["group"] for r in records} == {"nightly-e2e"}


def test_a_group_digest_arrives_once_across_a_sigkill_and_resume(sim: Sim, tmp_path: Path) -> None:
    ids, failed = create_group(sim)
    out, state = tmp_path / "out.jsonl", tmp_path / "state.db"
    with WebhookReceiver() as hook:
        config = group_config(tmp_path, sim, hook, out)
        args = ["-", "--config", str(config), "--group", "nightly-e2e", "--state", str(state), "--quiet"]
        with WatchProc(args, tmp=tmp_path, ids=ids) as proc:
            assert wait_until(lambda: count_lines(out) >= 5, 20), proc.result(-1)
            assert proc.running()
            proc.kill()
        assert count_lines(out) < len(ids)
        assert hook.snapshot() == []  # members were still running: no digest yet
        result = watch(args, tmp=tmp_path, ids=ids, timeout_s=40)
        assert result.rc == 1, result
        assert_one_digest(hook, sim, "nightly-e2e", ids, failed)
    assert_delivered_once(sim, read_jsonl(out), ids)


def test_a_group_name_reused_the_next_night_gets_a_second_digest(sim: Sim, tmp_path: Path) -> None:
    out, state = tmp_path / "out.jsonl", tmp_path / "state.db"
    with WebhookReceiver() as hook:
        config = group_config(tmp_path, sim, hook, out)
        args = ["-", "--config", str(config), "--group", "nightly", "--state", str(state), "--quiet"]
        nights = [sim.create(3, duration_s=2, outcome="completed") for _ in range(2)]
        for night, ids in enumerate(nights, start=1):
            result = watch(args, tmp=tmp_path, ids=ids, name=f"night{night}")
            assert result.rc == 0, result
            assert wait_until(lambda: len(hook.accepted()) >= night, 10), hook.snapshot()  # noqa: B023 -- used at once
        digests = [post.record() for post in hook.accepted()]
    assert [d["group"] for d in digests] == ["nightly", "nightly"]
    assert [d["total"] for d in digests] == [3, 3]
    assert digests[0]["batch"] != digests[1]["batch"]
    assert digests[0]["event_id"] != digests[1]["event_id"]  # a receiver deduping on it keeps both
    assert len({post.headers.get("Idempotency-Key") for post in hook.accepted()}) == 2
    assert_delivered_once(sim, read_jsonl(out), nights[0] + nights[1])


def _unknown_type(tmp_path: Path, sim: Sim) -> list[str]:
    config = write_config(tmp_path / "c.toml", sim, [{"type": "no-such-sink-e2e"}])
    return ["--config", str(config)]


def _webhook_ftp(tmp_path: Path, sim: Sim) -> list[str]:
    return [*sim_args(sim), "--sink", "webhook:ftp://127.0.0.1/hook"]


def _missing_command(tmp_path: Path, sim: Sim) -> list[str]:
    return [*sim_args(sim), "--sink", "command:/nonexistent/execmon-e2e-program"]


def _unwritable_jsonl(tmp_path: Path, sim: Sim) -> list[str]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    return [*sim_args(sim), "--sink", f"jsonl:{blocker / 'out.jsonl'}"]


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (_unknown_type, "no-such-sink-e2e"),
        (_webhook_ftp, "ftp"),
        (_missing_command, "/nonexistent/execmon-e2e-program"),
        (_unwritable_jsonl, "out.jsonl"),
    ],
    ids=["unknown-type", "webhook-not-http", "missing-command", "unwritable-jsonl"],
)
def test_sink_config_errors_stop_the_watch_before_any_request(
    sim: Sim, tmp_path: Path, build: Any, needle: str
) -> None:
    ids = sim.create(2, duration_s=60, outcome="completed")
    result = watch([*build(tmp_path, sim), *ids], tmp=tmp_path, timeout_s=20)
    assert result.rc == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result
    assert needle in result.stderr, result
    assert sim.stats()["requests_total"] == 0

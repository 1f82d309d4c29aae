"""The simulator over loopback: vendor shapes, keys, the order of checks, the rate limit, `/_sim`, speed."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from monitor.clock import parse_iso
from monitor.rates import RateLimit
from monitor.simulator.scenario import PlannedExecution, ProgressModel, parse_scenario
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator

KEY = "sk_test_local"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")
Start = Callable[..., Awaitable[tuple[Simulator, str]]]

# As on the vendor page, character for character.
NOT_FOUND_TEXT = """{
  "error": {
    "code": "not_found",
    "message": "Execution not found"
  }
}"""
UNAUTHORIZED_TEXT = """{
  "error": {
    "code": "unauthorized",
    "message": "Invalid or revoked API key"
  }
}"""


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    runners = []

    async def _start(**settings: Any) -> tuple[Simulator, str]:
        runner, url = await start_simulator(SimulatorSettings(**settings))
        runners.append(runner)
        return simulator_of(runner), url

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def status(
    http: aiohttp.ClientSession, url: str, execution_id: str, key: str = KEY
) -> tuple[int, dict[str, str], str]:
    async with http.get(f"{url}/api/v1/executions/{execution_id}/status", headers={"X-API-Key": key}) as r:
        return r.status, dict(r.headers), await r.text()


async def sim_json(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as r:
        return r.status, await r.json()


async def test_the_four_status_shapes(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(rate_limit=None)
    for outcome in ("completed", "failed", "cancelled"):
        sim.create(ids=[f"exec_{outcome}"], duration_s=0.2, outcome=outcome)
    sim.create(ids=["exec_running"], duration_s=600)
    code, _, text = await status(http, url, "exec_running")
    running = json.loads(text)
    assert code == 200
    assert set(running) == {"execution_id", "status", "progress", "current_step", "updated_at"}
    assert running["status"] == "running"
    assert running["execution_id"] == "exec_running"
    assert isinstance(running["progress"], int)
    assert 0 <= running["progress"] <= 99
    assert isinstance(running["current_step"], str)
    assert ISO_Z.match(running["updated_at"])
    await asyncio.sleep(0.25)
    bodies = {o: json.loads((await status(http, url, f"exec_{o}"))[2]) for o in ("completed", "failed", "cancelled")}
    done = bodies["completed"]
    assert set(done) == {"execution_id", "status", "progress", "result", "metadata", "completed_at"}
    assert done["progress"] == 100
    assert isinstance(done["result"], str)
    assert ISO_Z.match(done["completed_at"])
    assert isinstance(done["metadata"]["execution_time"], float)
    assert isinstance(done["metadata"]["tokens_used"], int)
    failed = bodies["failed"]
    assert set(failed) == {"execution_id", "status", "error", "metadata", "failed_at"}  # metadata: the contract's
    assert failed["error"]["code"] == "execution_error"
    assert failed["error"]["message"] == "Task execution failed"
    assert isinstance(failed["error"]["details"], str)
    assert ISO_Z.match(failed["failed_at"])
    cancelled = bodies["cancelled"]
    assert set(cancelled) == {"execution_id", "status", "progress", "metadata", "cancelled_at"}
    for body in bodies.values():
        assert body["metadata"]["execution_time"] == pytest.approx(0.2)
    assert cancelled["status"] == "cancelled"
    assert ISO_Z.match(cancelled["cancelled_at"])


async def test_whole_seconds_cut_every_timestamp_to_the_second_below(start: Start, http: aiohttp.ClientSession) -> None:
    """As the vendor's page shows them: `2025-11-11T10:30:15Z`, the second the change happened in."""
    sim, url = await start(rate_limit=None, whole_seconds=True)
    sim.create(ids=["exec_run"], duration_s=0.8)  # a step every 8 ms: updated_at moves between answers
    sim.create(ids=["exec_end"], duration_s=0.05)
    await asyncio.sleep(0.1)
    stamps = []
    for _ in range(3):
        running = json.loads((await status(http, url, "exec_run"))[2])
        stamps.append(running["updated_at"])
        await asyncio.sleep(0.03)
    done = json.loads((await status(http, url, "exec_end"))[2])
    for stamp in (*stamps, done["completed_at"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp), stamp
    ended = next(t.ended_at for t in sim.truth() if t.execution_id == "exec_end")
    assert ended is not None
    assert parse_iso(done["completed_at"]) == math.floor(sim.clock.wall(ended))


async def test_error_bodies_are_the_vendor_page_byte_for_byte(start: Start, http: aiohttp.ClientSession) -> None:
    _, url = await start()
    code, headers, text = await status(http, url, "exec_nope")
    assert (code, text) == (404, NOT_FOUND_TEXT)
    assert headers["Content-Type"].startswith("application/json")
    code, _, text = await status(http, url, "exec_nope", key="sk_live_wrong")
    assert (code, text) == (401, UNAUTHORIZED_TEXT)


async def test_missing_wrong_and_revoked_keys_get_401(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(api_keys=["sk_a_key", "sk_b_key"])
    [eid] = sim.create(count=1)
    assert (await status(http, url, eid, key="sk_a_key"))[0] == 200
    assert (await status(http, url, eid, key="sk_b_key"))[0] == 200
    async with http.get(f"{url}/api/v1/executions/{eid}/status") as r:
        assert r.status == 401
    assert await sim_json(http, "POST", f"{url}/_sim/keys/revoke", {"key": "sk_a_key"}) == (
        200,
        {"revoked": True},
    )
    assert (await status(http, url, eid, key="sk_a_key"))[0] == 401
    assert (await status(http, url, eid, key="sk_b_key"))[0] == 200
    sim.revoke("sk_b_key")
    assert (await status(http, url, eid, key="sk_b_key"))[0] == 401
    code, body = await sim_json(http, "POST", f"{url}/_sim/keys/revoke", {"keys": "x"})
    assert code == 400
    assert body["error"]["code"] == "bad_request"


async def test_order_of_checks_key_then_rate_then_id(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(rate_limit=RateLimit(1, 60.0))
    assert (await status(http, url, "exec_unknown"))[0] == 404  # uses the one request of the window
    code, headers, text = await status(http, url, "exec_unknown")
    assert code == 429
    assert json.loads(text)["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    assert (await status(http, url, "exec_unknown", key="sk_wrong"))[0] == 401  # not 429
    sim.revoke(KEY)
    assert (await status(http, url, "exec_unknown"))[0] == 401  # a throttled key that is revoked
    stats = sim.stats()
    assert stats["responses"] == {
        "200": 0,
        "401": 2,
        "404": 1,
        "429": 1,
        "5xx": 0,
        "dropped": 0,
        "malformed": 0,
    }
    assert stats["max_requests_in_window"] == 2  # 401s have no window to count in


async def test_burst_of_40_at_30_per_3s(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(rate_limit=RateLimit(30, 3.0))
    [eid] = sim.create(count=1, duration_s=600)
    answers = await asyncio.gather(*(status(http, url, eid) for _ in range(40)))
    codes = Counter(code for code, _, _ in answers)
    assert codes == {200: 30, 429: 10}
    for code, headers, text in answers:
        if code == 429:
            assert 1 <= int(headers["Retry-After"]) <= 3
            assert json.loads(text)["error"]["code"] == "rate_limited"
    stats = sim.stats()
    assert stats["max_requests_in_window"] == 40
    assert stats["requests_total"] == 40
    assert stats["rate_limit"] == {"limit": 30, "window_s": 3.0}
    assert sim.truth()[0].polls == 40


async def test_window_slides_and_retry_after_is_enough(start: Start, http: aiohttp.ClientSession) -> None:
    _, url = await start(rate_limit=RateLimit(2, 1.0))
    assert [(await status(http, url, "exec_x"))[0] for _ in range(3)] == [404, 404, 429]
    code, headers, _ = await status(http, url, "exec_x")
    assert code == 429
    await asyncio.sleep(float(headers["Retry-After"]) + 0.05)
    assert (await status(http, url, "exec_x"))[0] == 404


async def test_error_rate_answers_5xx(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(error_rate=1.0, rate_limit=None)
    [eid] = sim.create(count=1)
    answers = [await status(http, url, eid) for _ in range(30)]
    assert {code for code, _, _ in answers} <= {500, 502, 503}
    assert len({code for code, _, _ in answers}) >= 2
    assert any(text.lstrip().startswith("<") for _, _, text in answers)  # an HTML proxy page
    assert any(text.startswith("{") for _, _, text in answers)  # a small JSON error
    assert sim.stats()["responses"]["5xx"] == 30


async def test_malformed_rate_answers_200_that_does_not_parse(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(malformed_rate=1.0, rate_limit=None)
    [eid] = sim.create(count=1)
    for _ in range(30):
        code, _, text = await status(http, url, eid)
        assert code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    assert sim.stats()["responses"]["malformed"] == 30


async def raw_status(url: str, execution_id: str, key: str = KEY) -> bytes:
    """One GET on its own connection, returning the raw answer (b"" when the server closed without one).

    Not aiohttp's client: it silently re-sends an idempotent request once when the connection is
    closed under it, which would hide what the server did.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = (
        f"GET /api/v1/executions/{execution_id}/status HTTP/1.1\r\nHost: {host}\r\n"
        f"X-API-Key: {key}\r\nConnection: close\r\n\r\n"
    )
    writer.write(request.encode())
    try:
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_drop_rate_closes_the_connection_quietly(
    start: Start, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    sim, url = await start(drop_rate=1.0, rate_limit=None)
    [eid] = sim.create(count=1)
    for _ in range(5):
        assert await raw_status(url, eid) == b""  # no status line, nothing
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await status(http, url, eid)
    await asyncio.sleep(0.05)
    assert sim.stats()["responses"]["dropped"] >= 6
    loud = [r for r in caplog.records if r.levelno >= 30 or r.exc_info]
    assert loud == []


async def test_fault_fractions_and_the_totals_add_up(start: Start) -> None:
    sim, url = await start(error_rate=0.2, malformed_rate=0.2, drop_rate=0.1, rate_limit=None, seed=4)
    [eid] = sim.create(count=1)
    answers = [await raw_status(url, eid) for _ in range(400)]
    seen = Counter("dropped" if not a else a.split(b" ", 2)[1].decode() for a in answers)
    stats = sim.stats()
    responses = stats["responses"]
    assert sum(responses.values()) == stats["requests_total"] == 400
    assert seen["dropped"] == responses["dropped"]
    assert seen["500"] + seen["502"] + seen["503"] == responses["5xx"]
    assert seen["200"] == responses["200"] + responses["malformed"]
    assert responses["5xx"] == pytest.approx(80, abs=25)
    assert responses["malformed"] == pytest.approx(80, abs=25)
    assert responses["dropped"] == pytest.approx(40, abs=18)
    assert responses["200"] == pytest.approx(200, abs=30)


async def test_latency_delays_every_answer(start: Start, http: aiohttp.ClientSession) -> None:
    _sim, url = await start(latency_ms=150)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.gather(status(http, url, "exec_x"), status(http, url, "exec_y", key="bad"))
    assert loop.time() - began >= 0.15
    began = loop.time()
    await sim_json(http, "GET", f"{url}/_sim/stats")
    assert loop.time() - began < 0.15  # test-only endpoints are not delayed


async def test_speed_divides_every_duration(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(speed=20.0)
    code, body = await sim_json(http, "POST", f"{url}/_sim/executions", {"ids": ["exec_fast"], "duration_s": 2})
    assert code == 200
    assert body == {"execution_ids": ["exec_fast"]}
    [default] = sim.create(count=1)  # default duration 60 s -> 3 s
    truth = {t.execution_id: t for t in sim.truth()}
    end_fast = sim.end_time("exec_fast")
    end_default = sim.end_time(default)
    assert end_fast is not None
    assert end_default is not None
    assert end_fast - truth["exec_fast"].created_at == pytest.approx(0.1)
    assert end_default - truth[default].created_at == pytest.approx(3.0)
    await asyncio.sleep(0.15)
    done = json.loads((await status(http, url, "exec_fast"))[2])
    assert done["status"] == "completed"
    assert done["metadata"]["execution_time"] == pytest.approx(0.1)
    assert sim.stats()["rate_limit"] == {"limit": 30, "window_s": 60.0}  # speed leaves the limit alone


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"count": 2, "ids": ["exec_a"]}, 400, "not both"),
        ({}, 400, "count"),
        ({"count": 0}, 400, "count"),
        ({"count": True}, 400, "count"),
        ({"ids": []}, 400, "ids"),
        ({"ids": ["../admin"]}, 400, "invalid execution ID"),
        ({"ids": ["exec_a", "exec_a"]}, 400, "more than once"),
        ({"count": 1, "duration_s": -1}, 400, "duration_s"),
        ({"count": 1, "duration_s": "60"}, 400, "duration_s"),
        ({"count": 1, "outcome": "exploded"}, 400, "outcome"),
        ({"count": 1, "colour": "red"}, 400, "colour"),
        ({"count": 1, "progress": {"model": "log"}}, 400, "progress"),
        ({"count": 1, "duration_s": 60, "stall": {"at_s": 60, "for_s": 5}}, 400, "stall.at_s"),
        ({"count": 1, "stall": {"at_s": -1, "for_s": 5}}, 400, "stall.at_s"),
        ({"count": 1, "stall": {"at_s": 1, "for_s": 0}}, 400, "stall.for_s"),
        ({"count": 1, "stall": {"at_s": 1, "for_s": 5, "then": "explode"}}, 400, "stall.then"),
        ({"count": 1, "stall": {"at_s": 1}}, 400, "'stall' must be"),
        ({"count": 1, "stall": {"at_s": True, "for_s": 5}}, 400, "'stall' must be"),
        ({"count": 1, "stall": {"at_s": 1, "for_s": 5, "colour": 1}}, 400, "'stall' must be"),
        ({"count": 1, "stall": [1, 5]}, 400, "'stall' must be"),
        ([1, 2], 400, "object"),
        ({"ids": ["exec_taken"]}, 409, "exec_taken"),
    ],
)
async def test_create_rejects_bad_requests(
    start: Start, http: aiohttp.ClientSession, body: Any, code: int, needle: str
) -> None:
    sim, url = await start()
    sim.create(ids=["exec_taken"])
    got_code, got = await sim_json(http, "POST", f"{url}/_sim/executions", body)
    assert got_code == code
    assert needle in got["error"]["message"]
    assert got["error"]["code"] == ("conflict" if code == 409 else "bad_request")
    assert [t.execution_id for t in sim.truth()] == ["exec_taken"]  # nothing half-created


async def test_create_rejects_invalid_json(start: Start, http: aiohttp.ClientSession) -> None:
    _, url = await start()
    async with http.post(f"{url}/_sim/executions", data=b"{nope") as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == "the body is not valid JSON"


async def test_sim_endpoints_need_no_key_and_are_not_counted(start: Start, http: aiohttp.ClientSession) -> None:
    _sim, url = await start(rate_limit=RateLimit(1, 60.0))
    code, created = await sim_json(http, "POST", f"{url}/_sim/executions", {"count": 3, "outcome": "failed"})
    assert code == 200
    assert len(set(created["execution_ids"])) == 3
    for _ in range(5):
        assert (await sim_json(http, "GET", f"{url}/_sim/stats"))[0] == 200
        assert (await sim_json(http, "GET", f"{url}/_sim/executions"))[0] == 200
    code, stats = await sim_json(http, "GET", f"{url}/_sim/stats")
    assert stats == {
        "requests_total": 0,
        "responses": {"200": 0, "401": 0, "404": 0, "429": 0, "5xx": 0, "dropped": 0, "malformed": 0},
        "rate_limit": {"limit": 1, "window_s": 60.0},
        "max_requests_in_window": 0,
        "executions": {"running": 3, "completed": 0, "failed": 0, "cancelled": 0},
    }
    assert (await status(http, url, created["execution_ids"][0]))[0] == 200


async def test_ground_truth_lists_status_end_and_polls(start: Start, http: aiohttp.ClientSession) -> None:
    sim, url = await start(rate_limit=None)
    sim.create(ids=["exec_short"], duration_s=0.1, outcome="failed")
    sim.create(ids=["exec_long"], duration_s=600)
    for _ in range(3):
        await status(http, url, "exec_long")
    await asyncio.sleep(0.15)
    _, body = await sim_json(http, "GET", f"{url}/_sim/executions")
    rows = {row["execution_id"]: row for row in body["executions"]}
    assert set(rows["exec_short"]) == {
        "execution_id",
        "status",
        "progress",
        "created_at",
        "ended_at",
        "polls",
        "stalled_from",
        "stalled_until",
    }
    assert rows["exec_short"]["stalled_from"] is None  # it never stalls
    assert rows["exec_short"]["status"] == "failed"
    assert ISO_Z.match(rows["exec_short"]["ended_at"])
    assert rows["exec_short"]["polls"] == 0  # its end is known though nobody asked
    assert rows["exec_long"] == rows["exec_long"] | {"status": "running", "ended_at": None, "polls": 3}
    truth = {t.execution_id: t for t in sim.truth()}
    assert truth["exec_short"].ended_at == sim.end_time("exec_short")
    assert truth["exec_long"].ended_at is None
    assert sim.stats()["executions"] == {"running": 1, "completed": 0, "failed": 1, "cancelled": 0}


async def test_scenario_plan_honours_arrivals_and_not_found(start: Start, http: aiohttp.ClientSession) -> None:
    scenario = parse_scenario(
        {
            "seed": 1,
            "groups": [
                {"count": 3, "arrival": {"from_s": 0.3, "to_s": 0.3}, "duration": {"dist": "fixed", "s": 60}},
                {"count": 2, "duration": {"dist": "fixed", "s": 60}, "not_found": 1.0},
            ],
        },
        "inline",
    )
    plan = scenario.plan()
    sim, url = await start(rate_limit=None)
    sim.add_plan(plan)
    late = [p.execution_id for p in plan if p.exists]
    never = [p.execution_id for p in plan if not p.exists]
    assert len(late) == 3
    assert len(never) == 2
    assert (await status(http, url, late[0]))[0] == 404  # not created yet
    assert sim.truth() == []
    assert sorted(sim.not_found_ids()) == sorted(never)
    await asyncio.sleep(0.35)
    assert [(await status(http, url, i))[0] for i in late] == [200, 200, 200]
    assert [(await status(http, url, i))[0] for i in never] == [404, 404]
    _, body = await sim_json(http, "GET", f"{url}/_sim/executions")
    assert sorted(row["execution_id"] for row in body["executions"]) == sorted(late)
    assert sorted(body["not_found_ids"]) == sorted(never)
    assert sim.end_time(never[0]) is None


async def test_add_planned_creates_now_whatever_its_arrival(start: Start) -> None:
    sim, _ = await start(speed=2.0)
    planned = PlannedExecution(
        execution_id="exec_planned",
        arrival_s=500.0,
        duration_s=100.0,
        outcome="cancelled",
        end_s=40.0,
        progress=ProgressModel("steps", 0.0),
    )
    sim.add_planned(planned)
    [truth] = sim.truth()
    assert truth.created_at == pytest.approx(sim.now(), abs=0.01)
    assert sim.end_time("exec_planned") == pytest.approx(truth.created_at + 20.0)
    with pytest.raises(ValueError, match="exists already"):
        sim.add_planned(planned)


async def test_same_seed_same_executions(start: Start) -> None:
    first, _ = await start(seed=9)
    second, _ = await start(seed=9)
    ids = first.create(count=20)
    assert second.create(count=20) == ids
    ends = [(first.end_time(i) or 0) - t.created_at for i, t in zip(ids, first.truth(), strict=True)]
    assert ends == pytest.approx(
        [(second.end_time(i) or 0) - t.created_at for i, t in zip(ids, second.truth(), strict=True)]
    )


@pytest.mark.looptime
async def test_runs_on_virtual_time(start: Start, http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    sim, url = await start(rate_limit=RateLimit(30, 60.0))
    sim.create(ids=["exec_hour"], duration_s=3600, outcome="completed")
    began = loop.time()
    await asyncio.sleep(1800)
    half = json.loads((await status(http, url, "exec_hour"))[2])
    assert half["status"] == "running"
    assert 40 <= half["progress"] <= 60
    await asyncio.sleep(1800)
    done = json.loads((await status(http, url, "exec_hour"))[2])
    assert done["status"] == "completed"
    assert loop.time() - began >= 3600

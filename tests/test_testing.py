"""`monitor.testing.simulator`: the helper users put in their own tests, checked over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

import monitor.testing
from monitor.testing import LocalSimulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def poll(http: aiohttp.ClientSession, sim: LocalSimulator, execution_id: str, key: str | None = None) -> int:
    url = f"{sim.url}/api/v1/executions/{execution_id}/status"
    async with http.get(url, headers={"X-API-Key": key or sim.api_key}) as response:
        await response.read()
        return response.status


async def status_body(http: aiohttp.ClientSession, sim: LocalSimulator, execution_id: str) -> dict[str, Any]:
    url = f"{sim.url}/api/v1/executions/{execution_id}/status"
    async with http.get(url, headers={"X-API-Key": sim.api_key}) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def admin(http: aiohttp.ClientSession, sim: LocalSimulator, path: str) -> Any:
    async with http.get(f"{sim.url}/_sim/{path}") as response:
        assert response.status == 200
        return await response.json()


async def test_serves_the_status_api_on_loopback_with_the_given_key(http: aiohttp.ClientSession) -> None:
    async with monitor.testing.simulator(api_key="sk_test_mine") as sim:
        assert sim.url.startswith("http://127.0.0.1:")
        assert sim.api_key == "sk_test_mine"
        [execution_id] = await sim.create(count=1, duration_s=60)
        assert (await status_body(http, sim, execution_id))["status"] == "running"
        assert await poll(http, sim, execution_id, key="sk_test_other") == 401
        assert await poll(http, sim, "exec_never_created") == 404


async def test_executions_end_as_asked_and_speed_shortens_them(http: aiohttp.ClientSession) -> None:
    async with monitor.testing.simulator(speed=100.0, rate_limit=None) as sim:
        ids = await sim.create(ids=["exec_a", "exec_b"], duration_s=10, outcome="failed")
        assert ids == ["exec_a", "exec_b"]
        await asyncio.sleep(0.15)  # 10 s at speed 100
        bodies = [await status_body(http, sim, i) for i in ids]
    assert [b["status"] for b in bodies] == ["failed", "failed"]


async def test_truth_and_stats_are_the_sim_endpoints(http: aiohttp.ClientSession) -> None:
    async with monitor.testing.simulator() as sim:
        ids = await sim.create(count=3, duration_s=0.05, outcome="completed")
        await asyncio.sleep(0.1)
        for execution_id in ids:
            await poll(http, sim, execution_id)
        truth = sim.truth()
        assert truth == (await admin(http, sim, "executions"))["executions"]
        assert sim.stats() == await admin(http, sim, "stats")
    assert sorted(t["execution_id"] for t in truth) == sorted(ids)
    assert {t["status"] for t in truth} == {"completed"}
    assert all(t["polls"] == 1 and t["ended_at"] for t in truth)
    assert sim.stats()["responses"]["200"] == 3


async def test_the_rate_limit_is_enforced_and_counted(http: aiohttp.ClientSession) -> None:
    async with monitor.testing.simulator(rate_limit="3/60s") as sim:
        [execution_id] = await sim.create(count=1, duration_s=60)
        codes = [await poll(http, sim, execution_id) for _ in range(5)]
        stats = sim.stats()
    assert codes == [200, 200, 200, 429, 429]
    assert stats["rate_limit"] == {"limit": 3, "window_s": 60.0}
    assert stats["requests_total"] == 5
    assert stats["max_requests_in_window"] == 5  # every request counts, refused ones too


async def test_no_rate_limit(http: aiohttp.ClientSession) -> None:
    async with monitor.testing.simulator(rate_limit=None) as sim:
        [execution_id] = await sim.create(count=1, duration_s=60)
        codes = {await poll(http, sim, execution_id) for _ in range(40)}
        assert codes == {200}
        assert sim.stats()["rate_limit"] is None


async def test_revoke_makes_the_key_get_401(http: aiohttp.ClientSession) -> None:
    async with monitor.testing.simulator() as sim:
        [execution_id] = await sim.create(count=1, duration_s=60)
        assert await poll(http, sim, execution_id) == 200
        await sim.revoke(sim.api_key)
        assert await poll(http, sim, execution_id) == 401


async def test_the_same_seed_gives_the_same_ids() -> None:
    async with monitor.testing.simulator(seed=7) as first, monitor.testing.simulator(seed=7) as second:
        assert await first.create(count=5) == await second.create(count=5)
        assert first.seed == second.seed == 7
    async with monitor.testing.simulator() as fresh:
        assert isinstance(fresh.seed, int)  # shown so a failing run can be replayed


@pytest.mark.parametrize(
    "arguments",
    [{}, {"count": 0}, {"count": 1, "ids": ["exec_x"]}, {"ids": ["not valid!"]}, {"count": 1, "outcome": "exploded"}],
)
async def test_bad_create_arguments_raise_value_error(arguments: dict[str, Any]) -> None:
    async with monitor.testing.simulator() as sim:
        with pytest.raises(ValueError, match="'"):
            await sim.create(**arguments)


async def test_an_id_that_exists_already_is_refused() -> None:
    async with monitor.testing.simulator() as sim:
        await sim.create(ids=["exec_once"])
        with pytest.raises(ValueError, match="exists already"):
            await sim.create(ids=["exec_once"])


@pytest.mark.parametrize("settings", [{"rate_limit": "fast"}, {"speed": 0.0}, {"api_key": ""}])
async def test_bad_settings_raise_value_error(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"."):
        async with monitor.testing.simulator(**settings):
            pass


async def test_the_port_is_closed_on_exit_and_the_key_is_not_in_repr(http: aiohttp.ClientSession) -> None:
    async with monitor.testing.simulator(api_key="sk_test_hidden_key") as sim:
        shown = repr(sim)
    assert "sk_test_hidden_key" not in shown
    assert sim.url in shown
    with pytest.raises(aiohttp.ClientConnectionError):
        await poll(http, sim, "exec_gone")

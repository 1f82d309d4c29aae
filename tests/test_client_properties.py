"""Property: whatever ID is asked for, no request reaches any path but that ID's status path.

Checked on the server side: a catch-all route records the raw path of every request that arrives.
One server and one client serve all examples, on an event loop this module runs itself (hypothesis
drives a sync test; function-scoped fixtures do not mix with @given).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.api.client import ExecutionsClient
from monitor.ids import InvalidExecutionId
from monitor.secrets import Secret

ORACLE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # written here again on purpose: the spec, not the code

TRICKY = [
    "",
    ".",
    "..",
    "../admin",
    "../../etc/passwd",
    "%2e%2e",
    "%2E%2E/admin",
    "%2f",
    "a/b",
    "/",
    "\\",
    "..\\admin",
    "exec_1?debug=1",
    "exec_1#frag",
    "exec 1",
    "exec_1\n",
    "exec_1\x00",
    "exéc_1",
    "exec_\uff11",  # a fullwidth digit one
    "\u202eexec",
    ";exec",
    "exec_1;x=1",
    "~",
    "a" * 128,
    "a" * 129,
    "x" * 10_000,
    "exec_1a2b3c4d5e6f",
    "-",
    "_",
]

ids = st.one_of(
    st.sampled_from(TRICKY),
    st.from_regex(ORACLE, fullmatch=True),
    st.text(alphabet="./\\%2eE_-aZ09", max_size=24),
    st.text(max_size=200),
    st.text(min_size=10_000, max_size=10_240, alphabet="ab./%"),
)


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    client: ExecutionsClient
    paths: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    paths: list[str] = []

    async def catch_all(request: web.Request) -> web.StreamResponse:
        paths.append(request.raw_path)
        execution_id = request.raw_path.split("/")[4] if request.raw_path.count("/") >= 4 else ""
        return web.json_response({"execution_id": execution_id, "status": "running", "progress": 1})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", catch_all)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    client = ExecutionsClient(url, Secret("sk_test_property_key"), timeout_s=5)
    try:
        yield Harness(loop, client, paths)
    finally:
        loop.run_until_complete(client.close())
        loop.run_until_complete(runner.cleanup())
        loop.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(execution_id=ids)
def test_requests_reach_only_the_status_path_of_that_id(harness: Harness, execution_id: str) -> None:
    before = len(harness.paths)
    if ORACLE.fullmatch(execution_id):
        record = harness.loop.run_until_complete(harness.client.get_status(execution_id))
        assert record.execution_id == execution_id
        assert harness.paths[before:] == [f"/api/v1/executions/{execution_id}/status"]
    else:
        with pytest.raises(InvalidExecutionId):
            harness.loop.run_until_complete(harness.client.get_status(execution_id))
        assert harness.paths[before:] == []  # never reached the server

"""Schemathesis against the live control API, from the OpenAPI document kept in the repo.

Every operation, with generated valid and invalid (negative) inputs, with and without the token, and
as a web page would send it (a foreign Origin, a rebound Host): no 5xx, every answer matches the
document, and nothing from a rejected request is tracked.
The server runs in a thread of its own (schemathesis calls it synchronously, over real HTTP).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from control_fakes import MemoryBackend, serve_in_thread
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode, checks
from yarl import URL

from monitor.metrics import Metrics
from monitor.secrets import Secret
from monitor.service.control import ControlState, openapi_document

TOKEN = "schema-test-token-456"
MAX_EXAMPLES = 40

schema = schemathesis.openapi.from_dict(openapi_document())
# The token is sent by the test itself (with or without it), so schemathesis should not generate
# (or mutate) the Authorization header and then expect its mutation to be refused.
schema.config.generation.update(modes=list(GenerationMode), max_examples=MAX_EXAMPLES, with_security_parameters=False)
# A generated body over the size cap is rightly refused with 413 before its content is looked at.
schema.config.checks.negative_data_rejection.expected_statuses.append("413")


@dataclass
class LiveServer:
    url: str
    backend: MemoryBackend


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    backend = MemoryBackend()
    backend.add_view("exec_known", state="running", progress=10)
    state = ControlState(token=Secret(TOKEN), backend=backend, metrics=Metrics())
    with serve_in_thread(state, max_body_bytes=256 * 1024) as server:
        yield LiveServer(server.url, backend)


def _check_nothing_tracked_when_rejected(
    case: schemathesis.Case[Any], status: int, before: set[str], live: LiveServer
) -> None:
    if case.method.upper() == "POST" and status >= 400:
        after = live.backend.snapshot()
        assert after == before, f"a rejected POST ({status}) changed what is tracked: {sorted(after - before)[:5]}"


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=MAX_EXAMPLES)
def test_with_token(case: schemathesis.Case[Any], live_server: LiveServer) -> None:
    before = live_server.backend.snapshot()
    response = case.call_and_validate(base_url=live_server.url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500
    _check_nothing_tracked_when_rejected(case, response.status_code, before, live_server)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=10)
def test_without_token(case: schemathesis.Case[Any], live_server: LiveServer) -> None:
    before = live_server.backend.snapshot()
    if case.headers is not None:
        case.headers.pop("Authorization", None)  # the security scheme may have generated one
    response = case.call_and_validate(base_url=live_server.url)
    assert response.status_code < 500
    if case.path != "/healthz":
        assert response.status_code == 401
    _check_nothing_tracked_when_rejected(case, response.status_code, before, live_server)


# The answer is documented: status, content type and body. (Not the checks that expect the request
# itself to be judged, such as 405 for TRACE: these requests are refused before that.)
CONFORMANCE = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=3)
def test_a_foreign_origin_or_host_is_refused_as_documented(
    case: schemathesis.Case[Any], live_server: LiveServer
) -> None:
    """What a web page could send (its Origin; a rebound DNS name as Host): 403 and 421, as the document says."""
    before = live_server.backend.snapshot()
    port = URL(live_server.url).port
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for extra, want in (({"Origin": "http://evil.example"}, 403), ({"Host": f"evil.example:{port}"}, 421)):
        response = case.call_and_validate(base_url=live_server.url, headers={**auth, **extra}, checks=CONFORMANCE)
        assert response.status_code == want, (extra, response.text)
    assert live_server.backend.snapshot() == before

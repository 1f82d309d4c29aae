"""The control API closed by default, end to end: `execmon run` as a real process with no token
configured, `execmon add/ls` finding the token it generated through the config, and what a web page
in the user's browser could send (a cross-origin POST, a DNS-rebound Host) over plain HTTP.
"""

from __future__ import annotations

import http.client
import json
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e import (
    API_KEY,
    RATE,
    DaemonProc,
    HttpAnswer,
    Sim,
    clean_env,
    count_lines,
    free_port,
    run_cli,
    wait_for_lines,
    write_daemon_config,
)

pytestmark = pytest.mark.slow


@dataclass
class Rig:
    tmp: Path
    sim: Sim
    port: int
    config: Path
    state: Path
    out: Path
    env: dict[str, str]  # the API key only: no control token anywhere in the environment

    @property
    def token_file(self) -> Path:
        return Path(f"{self.state}.token")

    def start(self) -> DaemonProc:
        daemon = DaemonProc(self.config, self.port, tmp=self.tmp, env=self.env)
        daemon.wait_healthy()
        return daemon

    def cli(self, *args: str) -> tuple[int, str, str]:
        result = run_cli(*args, env={**self.env, "EXECMON_CONFIG": str(self.config)})
        return result.returncode, result.stdout, result.stderr

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> HttpAnswer:
        """One request exactly as given (a `Host` header replaces the one http.client would send)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            return HttpAnswer(answer.status, answer.read(), dict(answer.headers))
        finally:
            conn.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as sim:
        port = free_port()
        state, out = tmp_path / "state.db", tmp_path / "out.jsonl"
        # token_env names EXECMON_CONTROL_TOKEN, which is not set: no token is configured.
        config = write_daemon_config(
            tmp_path / "execmon.toml", sim, port=port, state=state, sinks=[{"type": "jsonl", "path": str(out)}]
        )
        yield Rig(tmp_path, sim, port, config, state, out, clean_env({"EXECMON_API_KEY": API_KEY}))


def test_with_no_token_configured_one_is_generated_and_the_commands_find_it(rig: Rig) -> None:
    assert not rig.token_file.exists()
    with rig.start() as daemon:
        assert stat.S_IMODE(rig.token_file.stat().st_mode) == 0o600
        token = rig.token_file.read_text().strip()
        assert len(token) >= 43

        assert rig.cli("ls") == (0, "0 executions\n", "")
        ids = rig.sim.create(3, duration_s=1)
        code, out, err = rig.cli("add", *ids)
        assert (code, out) == (0, "3 added, 0 already tracked\n"), err
        assert wait_for_lines(rig.out, 3, 20), daemon.stderr()[-2000:]

        for path in ("/v1/executions", "/metrics", f"/v1/executions/{ids[0]}", "/openapi.json"):
            for wrong in (None, "not-the-token"):
                assert daemon.api("GET", path, token=wrong).status == 401, (path, wrong)
            assert daemon.api("GET", path, token=token).status == 200, path
        assert daemon.api("POST", "/v1/executions", {"ids": ["exec_sneaky"]}, token=None).status == 401
        assert daemon.api("GET", "/healthz", token=None).status == 200
        code, out, _ = rig.cli("ls", "--json")
        assert code == 0
        assert sorted(v["execution_id"] for v in json.loads(out)["executions"]) == sorted(ids)
        assert token not in daemon.stderr()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(15) == 0, daemon.stderr()[-2000:]

    with rig.start() as daemon:  # a restart keeps the token: scripts that read the file go on working
        assert rig.token_file.read_text().strip() == token
        assert daemon.api("GET", "/v1/executions", token=token).status == 200
        assert rig.cli("ls")[0] == 0


def test_a_browser_style_cross_origin_post_is_refused_and_tracks_nothing(rig: Rig) -> None:
    """What a page on evil.example can make a browser send without asking first: text/plain, its Origin."""
    ids = rig.sim.create(50, duration_s=1)
    body = json.dumps({"ids": ids}).encode()
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    with rig.start() as daemon:
        token = rig.token_file.read_text().strip()
        here = f"127.0.0.1:{rig.port}"
        attempts = [
            ({**page, "Host": here}, 403),
            ({**page, "Host": here, "Authorization": f"Bearer {token}"}, 403),  # even with the token
            ({**page, "Host": f"evil.example:{rig.port}"}, 421),  # DNS rebinding: the page's own name
            ({"Content-Type": "text/plain", "Host": here, "Authorization": f"Bearer {token}"}, 415),
        ]
        for headers, want in attempts:
            answer = rig.send("POST", "/v1/executions", headers, body)
            assert answer.status == want, (headers, answer)
            assert answer.json()["error"]["code"], answer
        time.sleep(2.0)  # anything tracked would have been polled by now
        assert rig.cli("ls") == (0, "0 executions\n", "")
        assert rig.sim.stats()["requests_total"] == 0
        assert count_lines(rig.out) == 0
        assert daemon.running()


def test_a_rebound_host_gets_421_even_with_the_token(rig: Rig) -> None:
    with rig.start():
        token = rig.token_file.read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        for path in ("/v1/executions", "/metrics", "/healthz"):
            answer = rig.send("GET", path, {**auth, "Host": f"evil.example:{rig.port}"})
            assert (answer.status, answer.json()["error"]["code"]) == (421, "misdirected_request"), path
            for host in (f"127.0.0.1:{rig.port}", f"localhost:{rig.port}"):
                assert rig.send("GET", path, {**auth, "Host": host}).status == 200, (path, host)

"""Helpers for the end-to-end tests: real `execmon simulate` and `execmon watch` processes, a webhook receiver.

Everything here is black-box: the CLI, exit codes, files, and the simulator's ground truth
(`/_sim/stats`, `/_sim/executions`). The webhook receiver is an aiohttp server on loopback that
runs in its own thread (with its own event loop), so a test can drive subprocesses with plain
blocking calls while the receiver keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web

API_KEY = "sk_test_e2e_key"
RATE = "30/3s"
LIMIT = 30
LISTENING = re.compile(r"^listening on (http://[^\s]+)\s*$")


def execmon(*args: str) -> list[str]:
    return [sys.executable, "-m", "monitor", *args]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any EXECMON_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECMON_")}
    env.update(extra or {})
    return env


# -- the simulator -----------------------------------------------------------------------------


class Sim:
    """One `execmon simulate --port 0` process and its test-only endpoints."""

    def __init__(self, proc: subprocess.Popen[str], url: str, err_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.err_path = err_path

    @classmethod
    @contextlib.contextmanager
    def running(cls, tmp: Path, *args: str, api_keys: Sequence[str] = (API_KEY,)) -> Iterator[Sim]:
        keys = [part for key in api_keys for part in ("--api-key", key)]
        err_path = tmp / f"sim-{time.monotonic_ns()}.err"
        with err_path.open("w") as err:
            proc = subprocess.Popen(
                execmon("simulate", "--port", "0", *keys, *args),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env=clean_env(),
            )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = LISTENING.match(line)
            assert match, f"simulator's first line {line!r}; stderr: {err_path.read_text()[-500:]}"
            yield cls(proc, match.group(1), err_path)
        finally:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()

    def request(self, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                return int(answer.status), json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"null")

    def create(
        self,
        count: int | None = None,
        *,
        ids: list[str] | None = None,
        duration_s: float,
        outcome: str | None = "completed",
    ) -> list[str]:
        body: dict[str, Any] = {"duration_s": duration_s}
        if ids is not None:
            body["ids"] = ids
        else:
            body["count"] = count
        if outcome is not None:
            body["outcome"] = outcome
        code, answer = self.request("/_sim/executions", body)
        assert code == 200, answer
        created: list[str] = answer["execution_ids"]
        return created

    def stats(self) -> dict[str, Any]:
        code, answer = self.request("/_sim/stats")
        assert code == 200, answer
        result: dict[str, Any] = answer
        return result

    def truth(self) -> dict[str, dict[str, Any]]:
        """Ground truth by execution ID."""
        code, answer = self.request("/_sim/executions")
        assert code == 200, answer
        return {row["execution_id"]: row for row in answer["executions"]}

    def revoke(self, key: str) -> None:
        code, answer = self.request("/_sim/keys/revoke", {"key": key})
        assert code == 200, answer

    def assert_budget_held(self, limit: int = LIMIT) -> dict[str, Any]:
        """The server never refused a request and never saw more than `limit` in one window."""
        stats = self.stats()
        assert stats["responses"]["429"] == 0, stats
        assert stats["max_requests_in_window"] <= limit, stats
        return stats


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace_s: float = 5.0) -> None:
    """Stop a child we started (signal, then SIGKILL) and reap it, whatever state it is in."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- execmon watch ---------------------------------------------------------------------------


@dataclass
class WatchResult:
    rc: int
    stdout: str
    stderr: str
    elapsed_s: float

    def records(self) -> list[dict[str, Any]]:
        """stdout's result records; every non-blank line must be one JSON object."""
        return parse_json_lines(self.stdout, "stdout")

    def log_lines(self) -> list[dict[str, Any]]:
        """stderr's structured lines (on a pipe every line must be a JSON object)."""
        return parse_json_lines(self.stderr, "stderr")

    def __str__(self) -> str:
        return f"rc={self.rc} after {self.elapsed_s:.1f}s\nstdout: {self.stdout[-1500:]}\nstderr: {self.stderr[-3000:]}"


def parse_json_lines(text: str, what: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise AssertionError(f"{what} line is not JSON: {line!r}\nall of {what}:\n{text[-2000:]}") from None
        assert isinstance(row, dict), f"{what} line is not a JSON object: {line!r}"
        rows.append(row)
    return rows


class WatchProc:
    """One `execmon watch` process; stdout and stderr go to files (appended across runs)."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        tmp: Path,
        ids: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        name: str = "watch",
    ) -> None:
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        self._out_start = self.out_path.stat().st_size if self.out_path.exists() else 0
        self._err_start = self.err_path.stat().st_size if self.err_path.exists() else 0
        stdin_path = tmp / f"{name}.ids"
        stdin_path.write_text("".join(f"{i}\n" for i in ids or ()))
        full_env = clean_env({"EXECMON_API_KEY": API_KEY, **(env or {})})
        self.started = time.monotonic()
        with stdin_path.open() as stdin, self.out_path.open("a") as out, self.err_path.open("a") as err:
            self.proc = subprocess.Popen(
                execmon("watch", *args), stdin=stdin, stdout=out, stderr=err, env=full_env, text=True
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL (no chance to clean up), then reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float = 60.0) -> WatchResult:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"execmon watch did not end in {timeout_s} s:\n{self.result(-9)}") from None
        result = self.result(rc)
        assert "Traceback" not in result.stderr, f"execmon watch crashed:\n{result}"  # never, whatever the input
        return result

    def result(self, rc: int) -> WatchResult:
        elapsed = time.monotonic() - self.started
        out = self.out_path.read_bytes()[self._out_start :].decode()
        err = self.err_path.read_bytes()[self._err_start :].decode()
        return WatchResult(rc, out, err, elapsed)


def watch(
    args: Sequence[str],
    *,
    tmp: Path,
    ids: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    name: str = "watch",
) -> WatchResult:
    """Run `execmon watch ARGS` to its end (killed and failed after `timeout_s`)."""
    with WatchProc(args, tmp=tmp, ids=ids, env=env, name=name) as proc:
        return proc.wait(timeout_s)


def sim_args(sim: Sim, *extra: str) -> list[str]:
    """`--base-url` and `--rate-limit` for `sim`, then `extra`."""
    return ["--base-url", sim.url, "--rate-limit", RATE, *extra]


# -- files -----------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a jsonl sink's file; every line must be a whole JSON object."""
    if not path.exists():
        return []
    return parse_json_lines(path.read_text(), str(path))


def iso_seconds(text: str) -> float:
    """An ISO 8601 timestamp (with `Z`) as epoch seconds."""
    return datetime.fromisoformat(text).timestamp()


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def execution_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind", "execution") == "execution"]


def by_id(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records by execution ID; fails on a duplicate."""
    found: dict[str, dict[str, Any]] = {}
    for record in execution_records(records):
        execution_id = record["execution_id"]
        assert execution_id not in found, f"two records for {execution_id}: {found[execution_id]} and {record}"
        found[execution_id] = record
    return found


def assert_delivered_once(sim: Sim, records: Sequence[dict[str, Any]], ids: Sequence[str]) -> None:
    """Exactly one record per ID, none for anything else, each with the outcome the simulator says."""
    got = by_id(records)
    assert sorted(got) == sorted(set(ids)), f"missing {set(ids) - set(got)}, extra {set(got) - set(ids)}"
    truth = sim.truth()
    wrong = {i: (r["outcome"], truth[i]["status"]) for i, r in got.items() if r["outcome"] != truth[i]["status"]}
    assert not wrong, f"outcome differs from the simulator's (record, truth): {wrong}"


def write_config(path: Path, sim: Sim, sinks: Sequence[dict[str, Any]], *, rate: str = RATE) -> Path:
    """A TOML config file with the simulator as the API and the given [[sinks]] tables."""
    lines = ["[api]", f"base_url = {json.dumps(sim.url)}", 'api_key_env = "EXECMON_API_KEY"', f'rate_limit = "{rate}"']
    for sink in sinks:
        lines.append("[[sinks]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in sink.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the webhook receiver ----------------------------------------------------------------------


@dataclass
class Post:
    """One POST the receiver saw. `status` is what it answered (0 while held, or never answered)."""

    number: int
    at: float  # wall clock, when it arrived
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    status: int = 0
    answered_at: float | None = None

    def record(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class WebhookReceiver:
    """A webhook endpoint on loopback, run in its own thread.

    The first `hang_first` posts are held `hang_s` seconds (or until the receiver stops) before
    they are answered; the first `fail_first` posts are answered 500; the rest 200.
    """

    secret: str | None = None
    fail_first: int = 0
    hang_first: int = 0
    hang_s: float = 3600.0
    posts: list[Post] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _stopping: asyncio.Event | None = None

    def __enter__(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(ready, failure), daemon=True)
        self._thread.start()
        assert ready.wait(10), "the webhook receiver did not start"
        if failure:
            raise failure[0]
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to the test thread
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _shutdown(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        good = True
        if self.secret is not None:
            want = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            good = hmac.compare_digest(request.headers.get("X-Execmon-Signature", ""), want)
        with self._lock:
            post = Post(len(self.posts) + 1, time.time(), dict(request.headers), body, good)
            self.posts.append(post)
        if post.number <= self.hang_first:
            assert self._stopping is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.hang_s)
            if self._stopping.is_set():
                return web.Response(status=503)  # the receiver is going away: this post was never answered
        status = 500 if post.number <= self.fail_first else 200
        with self._lock:
            post.status = status
            post.answered_at = time.time()
        return web.Response(status=status)

    def snapshot(self) -> list[Post]:
        with self._lock:
            return list(self.posts)

    def accepted(self) -> list[Post]:
        """Posts answered 2xx, in arrival order."""
        return [p for p in self.snapshot() if 200 <= p.status < 300]

    def accepted_by_key(self) -> dict[str, Post]:
        """Accepted posts by Idempotency-Key; fails if a key was accepted twice or is missing."""
        found: dict[str, Post] = {}
        for post in self.accepted():
            key = post.headers.get("Idempotency-Key")
            assert key, f"post {post.number} has no Idempotency-Key"
            assert key not in found, f"Idempotency-Key {key} accepted twice"
            found[key] = post
        return found


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `predicate()` until it is true or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def wait_for_lines(path: Path, count: int, timeout_s: float) -> bool:
    """Wait until `path` holds at least `count` lines (checked often, to act right after a write)."""
    return wait_until(lambda: count_lines(path) >= count, timeout_s, interval_s=0.005)


# -- execmon run (the daemon) and its client commands ------------------------------------------

CONTROL_TOKEN = "e2e-control-token-7731"


_PORTS_FROM, _PORTS_PER_WORKER = 20000, 1500  # below Linux's ephemeral range (32768-60999)


def free_port() -> int:
    """A TCP port free on loopback right now (the daemon binds it a moment later).

    Not one the kernel hands out for port 0: between this check and the daemon's bind, any client
    connection of a parallel test could take an ephemeral port. Each pytest-xdist worker draws from
    a range of its own, below the ephemeral ones, so two workers never race for one either."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = _PORTS_FROM + (int(worker) % 8 if worker.isdigit() else 0) * _PORTS_PER_WORKER
    rng = random.Random()
    for _ in range(200):
        port = base + rng.randrange(_PORTS_PER_WORKER)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + _PORTS_PER_WORKER}")


def toml_value(value: object) -> str:
    """A TOML scalar or array (JSON's spelling is valid TOML for these)."""
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def write_daemon_config(
    path: Path,
    sim: Sim,
    *,
    port: int,
    state: Path,
    sinks: Sequence[dict[str, Any]],
    rate: str = RATE,
    api_key_file: Path | None = None,
    api: dict[str, Any] | None = None,
    control: dict[str, Any] | None = None,
    polling: dict[str, Any] | None = None,
    state_options: dict[str, Any] | None = None,
) -> Path:
    """A config for `execmon run`: the simulator as the API, control API on 127.0.0.1:`port`,
    token from $EXECMON_CONTROL_TOKEN, the key from $EXECMON_API_KEY unless `api_key_file`."""
    key = f"api_key_file = {toml_value(api_key_file)}" if api_key_file else 'api_key_env = "EXECMON_API_KEY"'
    lines = ["[api]", f"base_url = {toml_value(sim.url)}", key, f"rate_limit = {toml_value(rate)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (api or {}).items()]
    lines += ["[state]", f"path = {toml_value(state)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (state_options or {}).items()]
    lines += ["[control]", f'listen = "127.0.0.1:{port}"', 'token_env = "EXECMON_CONTROL_TOKEN"']
    lines += [f"{k} = {toml_value(v)}" for k, v in (control or {}).items()]
    if polling:
        lines += ["[polling]", *(f"{k} = {toml_value(v)}" for k, v in polling.items())]
    for sink in sinks:
        lines += ["[[sinks]]", *(f"{k} = {toml_value(v)}" for k, v in sink.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment with the test's API key and control token."""
    return clean_env({"EXECMON_API_KEY": API_KEY, "EXECMON_CONTROL_TOKEN": CONTROL_TOKEN, **(extra or {})})


@dataclass
class HttpAnswer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str, url: str, *, body: object = None, data: bytes | None = None, token: str | None = None
) -> HttpAnswer:
    """One request with urllib; an HTTP error status is returned, not raised."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return HttpAnswer(int(answer.status), answer.read(), dict(answer.headers))
    except urllib.error.HTTPError as exc:
        with exc:
            return HttpAnswer(exc.code, exc.read(), dict(exc.headers))


class DaemonProc:
    """`execmon run --config FILE` as a child process; stdout/stderr appended to `<name>.out/.err`.

    Every start of the same name appends to the same files; `stderr()` is this start's part only.
    Leaving the `with` block SIGKILLs it if it still runs.
    """

    def __init__(
        self, config: Path, port: int, *, tmp: Path, env: dict[str, str] | None = None, name: str = "daemon"
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        self._err_start = self.err_path.stat().st_size if self.err_path.exists() else 0
        self.started = time.monotonic()
        with self.out_path.open("a") as out, self.err_path.open("a") as err:
            self.proc = subprocess.Popen(
                execmon("run", "--config", str(config)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env if env is not None else daemon_env(),
                text=True,
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err_path.read_bytes()[self._err_start :].decode(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """This start's structured log lines (JSON on a pipe)."""
        return parse_json_lines(self.stderr(), "daemon stderr")

    def health(self) -> HttpAnswer | None:
        """GET /healthz, or None while nothing answers."""
        try:
            return http("GET", self.url + "/healthz")
        except OSError:
            return None

    def wait_healthy(self, timeout_s: float = 15.0) -> None:
        def healthy() -> bool:
            assert self.running(), f"the daemon exited {self.proc.returncode}: {self.stderr()[-2000:]}"
            answer = self.health()
            return answer is not None and answer.status == 200

        assert wait_until(healthy, timeout_s, 0.05), f"not healthy in {timeout_s} s: {self.stderr()[-2000:]}"

    def api(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        data: bytes | None = None,
        token: str | None = CONTROL_TOKEN,
    ) -> HttpAnswer:
        """A control API request (with the test's token unless `token=None`); `data`: a raw body."""
        return http(method, self.url + path, body=body, data=data, token=token)

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (no chance to clean up), then reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def wait(self, timeout_s: float) -> int:
        """Its exit status; fails (after a SIGKILL) if it is still running after `timeout_s`."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the daemon did not exit in {timeout_s} s: {self.stderr()[-2000:]}") from None


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout_s: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`execmon ARGS` (add, ls, status, rm, run ...) to its end; never a traceback."""
    result = subprocess.run(
        execmon(*args),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env if env is not None else daemon_env(),
        timeout=timeout_s,
        check=False,
    )
    assert "Traceback" not in result.stderr, f"execmon {' '.join(args)} crashed: {result.stderr[-3000:]}"
    return result

"""The CLI's client for the daemon's control API (`execmon add`, `ls`, `status`, `rm`).

Synchronous on purpose: each command makes a few requests and exits. It uses `http.client` (no
proxy environment variables, one kept-alive connection for paging) and turns every failure into a
one-line `ControlError` (exit 2): daemon not running, token rejected, bad answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from monitor.config import find_config_path, load_config
from monitor.errors import UsageError
from monitor.ids import ALLOWED_DESCRIPTION, ids_from_arguments, is_valid_execution_id
from monitor.records import new_batch_id
from monitor.secrets import Secret
from monitor.service.control_token import read_token_file, token_path
from monitor.service.validation import MAX_IDS, MAX_LIMIT

DEFAULT_TIMEOUT_S = 60.0  # a POST of 10,000 IDs writes them all to SQLite before answering


class ControlError(UsageError):
    """The control API could not be reached or refused the request (one line, exit 2)."""


class NotTracked(ControlError):
    """404 for one execution ID: exit 1, like `rm` of a missing file (mapped in `monitor.cli`)."""


@dataclass(frozen=True, slots=True)
class ControlTarget:
    """Where the daemon listens and how to authenticate, from the same config the daemon reads."""

    base_url: str
    host: str
    port: int
    token: Secret | None
    token_env: str
    token_file: str = ""  # where a daemon with no configured token keeps the one it generated


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $EXECMON_CONFIG, else ./execmon.toml when it exists)",
    )


def add_ids_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ids", nargs="*", metavar="ID", help="execution IDs, or - to read them from stdin, one per line"
    )


def read_ids(args: Iterable[str], stdin: TextIO) -> list[str]:
    """IDs from the arguments, `-` meaning stdin (blank lines and # comments skipped), deduplicated.

    Every ID is checked before anything is sent, so a bad one means nothing is tracked.
    """
    ids = ids_from_arguments(args, stdin)
    if not ids:
        raise UsageError("no execution IDs given (pass them as arguments, or - to read them from stdin)")
    invalid = [i for i in ids if not is_valid_execution_id(i)]
    if invalid:
        shown = ", ".join(repr(i if len(i) <= 40 else i[:37] + "...") for i in invalid[:3])
        more = f" and {len(invalid) - 3} more" if len(invalid) > 3 else ""
        raise UsageError(
            f"{len(invalid)} invalid execution ID(s): {shown}{more} "
            f"(allowed are {ALLOWED_DESCRIPTION}); nothing was sent"
        )
    return list(dict.fromkeys(ids))


def target_from_config(config_path: str | None, env: Mapping[str, str] = os.environ) -> ControlTarget:
    """Control address and token from `--config`, `EXECMON_CONFIG` or `./execmon.toml` (else defaults).

    The token is the configured one, else the one the daemon generated beside its state file."""
    config = load_config(find_config_path(config_path, env=env), env=env)
    configured = config.control_token()
    generated = token_path(config)
    host, port = config.control.listen
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached through loopback
        host = "127.0.0.1" if host != "::" else "::1"
    shown = f"[{host}]" if ":" in host else host
    return ControlTarget(
        base_url=f"http://{shown}:{port}",
        host=host,
        port=port,
        token=configured if configured is not None else read_token_file(generated),
        token_env=config.control.token_env,
        token_file=str(generated),
    )


class ControlClient:
    """Requests to one daemon. Use as a context manager (closes the connection)."""

    def __init__(self, target: ControlTarget, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self._conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    # --- the endpoints -------------------------------------------------------------------------

    def track(
        self,
        ids: list[str],
        *,
        deadline_s: float | None = None,
        group: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> dict[str, list[str]]:
        """POST the IDs in chunks of at most MAX_IDS; the caller validated every ID beforehand,
        so no chunk is rejected for its IDs after an earlier one was tracked."""
        added: list[str] = []
        already: list[str] = []
        batch = new_batch_id() if group is not None else None  # one call, one batch, however many chunks
        for start in range(0, len(ids), MAX_IDS):
            body: dict[str, Any] = {"ids": ids[start : start + MAX_IDS], "labels": dict(labels or {})}
            if deadline_s is not None:
                body["deadline_s"] = deadline_s
            if group is not None:
                body["group"] = group
                body["batch"] = batch
            answer = self._request("POST", "/v1/executions", body)
            added.extend(answer.get("added", []))
            already.extend(answer.get("already_tracked", []))
        return {"added": added, "already_tracked": already}

    def list_page(self, status: str | None, limit: int, offset: int) -> dict[str, Any]:
        query = f"?limit={limit}&offset={offset}" + (f"&status={status}" if status else "")
        answer: dict[str, Any] = self._request("GET", "/v1/executions" + query)
        return answer

    def iter_executions(self, status: str | None = None, page_size: int = MAX_LIMIT) -> Iterator[dict[str, Any]]:
        """Every tracked execution matching `status`, page by page."""
        offset = 0
        while True:
            page = self.list_page(status, page_size, offset)
            views = page.get("executions", [])
            yield from views
            offset += len(views)
            if len(views) < page_size or offset >= int(page.get("total", 0)):
                return

    def get(self, execution_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._request("GET", f"/v1/executions/{execution_id}")
        return answer

    def remove(self, execution_id: str) -> None:
        self._request("DELETE", f"/v1/executions/{execution_id}")

    def retry_dead_letters(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Queue dead letters again in the daemon (all, one sink's or one event's): how many."""
        body = {k: v for k, v in (("sink", sink), ("event_id", event_id)) if v is not None}
        answer = self._request("POST", "/v1/dead-letters/retry", body)
        return int(answer.get("retried", 0)) if isinstance(answer, dict) else 0

    # --- plumbing ------------------------------------------------------------------------------

    def _unreachable(self) -> ControlError:
        return ControlError(f"cannot reach the execmon daemon at {self.target.base_url}: is `execmon run` running?")

    def _request(self, method: str, path: str, body: object | None = None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.target.token is not None:
            headers["Authorization"] = f"Bearer {self.target.token.reveal()}"
        try:
            status, raw = self._send(method, path, data, headers)
        except (OSError, http.client.HTTPException):
            raise self._unreachable() from None
        return self._decode(status, raw)

    def _send(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self._conn.request(method, path, body=data, headers=headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The daemon closed an idle kept-alive connection: reconnect once. Requests are
                # idempotent (tracking an ID twice is a no-op), so a resend is safe.
                self._conn.close()
                if attempt == 2:
                    raise
            except TimeoutError:
                raise ControlError(f"the execmon daemon at {self.target.base_url} did not answer in time") from None
        raise AssertionError("unreachable")

    def _token_problem(self) -> str:
        if self.target.token is None:
            return (
                f"no control token: set {self.target.token_env}, or start the daemon with this config "
                f"(it keeps its token in {self.target.token_file})"
            )
        return f"the control token was rejected: set {self.target.token_env}"

    def _decode(self, status: int, raw: bytes) -> Any:
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if 200 <= status < 300 and payload is not None:
            return payload
        if status == 401:
            raise ControlError(self._token_problem())
        error = payload.get("error") if isinstance(payload, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str):
            message = f"unexpected answer {status} from {self.target.base_url}"
        if status == 404 and isinstance(error, dict) and error.get("code") == "not_found":
            raise NotTracked(message)
        raise ControlError(message)

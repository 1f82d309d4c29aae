"""The simulator's test-only endpoints under `/_sim`: ground truth, stats, creating executions, revoking keys.

They are outside the vendor API: no key needed, never counted in the rate limit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web

from monitor.clock import Clock
from monitor.simulator.errors import SimulatorRequestError
from monitor.simulator.scenario import ProgressKind, ProgressModel, Stall, StallThen

_CREATE_KEYS = ("count", "ids", "duration_s", "outcome", "progress", "stall")
_STALL_KEYS = ("at_s", "for_s", "then")


# What these routes use of server.Simulator and its ExecutionTruth rows, as Protocols: server.py imports
# this module, so importing server here (even only for type checking) would make an import cycle.
class TruthRow(Protocol):
    @property
    def execution_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def progress(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def ended_at(self) -> float | None: ...
    @property
    def polls(self) -> int: ...
    @property
    def stalled_from(self) -> float | None: ...
    @property
    def stalled_until(self) -> float | None: ...
    @property
    def kind(self) -> str | None: ...


class SimulatorLike(Protocol):
    @property
    def clock(self) -> Clock: ...

    def create(
        self,
        *,
        count: int | None = ...,
        ids: list[str] | None = ...,
        duration_s: float = ...,
        outcome: str | None = ...,
        progress: ProgressModel | None = ...,
        stall: Stall | None = ...,
    ) -> list[str]: ...

    def revoke(self, key: str) -> None: ...
    def truth(self) -> Sequence[TruthRow]: ...
    def not_found_ids(self) -> list[str]: ...
    def stats(self) -> dict[str, Any]: ...


def add_admin_routes(app: web.Application, simulator: SimulatorLike) -> None:
    async def stats(_: web.Request) -> web.Response:
        return web.json_response(simulator.stats())

    async def executions(_: web.Request) -> web.Response:
        return web.json_response(ground_truth(simulator))

    async def create(request: web.Request) -> web.Response:
        try:
            payload = await _json_object(request)
            ids = simulator.create(**_create_arguments(payload))
        except SimulatorRequestError as exc:
            return _error(exc.status, exc.code, str(exc))
        return web.json_response({"execution_ids": ids})

    async def revoke(request: web.Request) -> web.Response:
        try:
            payload = await _json_object(request)
            key = payload.get("key")
            if not isinstance(key, str) or not key or set(payload) != {"key"}:
                raise SimulatorRequestError('expected {"key": "<the API key to revoke>"}')
        except SimulatorRequestError as exc:
            return _error(exc.status, exc.code, str(exc))
        simulator.revoke(key)
        return web.json_response({"revoked": True})

    app.router.add_get("/_sim/stats", stats)
    app.router.add_get("/_sim/executions", executions)
    app.router.add_post("/_sim/executions", create)
    app.router.add_post("/_sim/keys/revoke", revoke)


def ground_truth(simulator: SimulatorLike) -> dict[str, Any]:
    """The GET /_sim/executions body: what really happened, with wall-clock timestamps."""
    return {
        "executions": [_truth_row(t, simulator.clock) for t in simulator.truth()],
        "not_found_ids": simulator.not_found_ids(),
    }


def _truth_row(truth: TruthRow, clock: Clock) -> dict[str, Any]:
    def iso(at: float | None) -> str | None:
        return None if at is None else clock.iso(at)

    row: dict[str, Any] = {
        "execution_id": truth.execution_id,
        "status": truth.status,
        "progress": truth.progress,
        "created_at": clock.iso(truth.created_at),
        "ended_at": iso(truth.ended_at),
        "polls": truth.polls,
        "stalled_from": iso(truth.stalled_from),  # planned: shown before the stall too
        "stalled_until": iso(truth.stalled_until),
    }
    if truth.kind is not None:
        row["kind"] = truth.kind
    return row


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        payload = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise SimulatorRequestError("the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise SimulatorRequestError("the body must be a JSON object")
    return payload


def _create_arguments(payload: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(payload) - set(_CREATE_KEYS))
    if unknown:
        raise SimulatorRequestError(f"unknown key {unknown[0]!r} (allowed: {', '.join(_CREATE_KEYS)})")
    arguments: dict[str, Any] = {
        "count": payload.get("count"),
        "ids": payload.get("ids"),
        "duration_s": payload.get("duration_s", 60.0),
        "outcome": payload.get("outcome"),
    }
    if "progress" in payload:
        arguments["progress"] = _progress_model(payload["progress"])
    if "stall" in payload:
        arguments["stall"] = _stall(payload["stall"])
    return arguments


def _stall(value: object) -> Stall:
    """The shape of `stall`; Simulator.create checks the values against the execution's duration."""
    usage = '\'stall\' must be {"at_s": seconds, "for_s": seconds, "then": "resume" | "fail"}'
    if not isinstance(value, dict) or set(value) - set(_STALL_KEYS) or not {"at_s", "for_s"} <= set(value):
        raise SimulatorRequestError(usage)
    at_s, for_s, then = value["at_s"], value["for_s"], value.get("then", StallThen.RESUME)
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (at_s, for_s)) or not isinstance(then, str):
        raise SimulatorRequestError(usage)
    return Stall(float(at_s), float(for_s), then)


def _progress_model(value: object) -> ProgressModel:
    allowed = [kind.value for kind in ProgressKind]
    if not isinstance(value, dict) or value.get("model") not in allowed or set(value) - {"model", "noise"}:
        raise SimulatorRequestError(f'\'progress\' must be {{"model": one of {allowed}, "noise": number}}')
    noise = value.get("noise", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0 <= noise < 1000:
        raise SimulatorRequestError("'progress.noise' must be a number >= 0")
    return ProgressModel(str(value["model"]), float(noise))


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)

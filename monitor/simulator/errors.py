"""Errors of the simulator's test-only API, each with the HTTP status it is answered with."""

from __future__ import annotations


class SimulatorRequestError(ValueError):
    """A bad request to a test-only endpoint or to `Simulator.create` (HTTP 400)."""

    status = 400
    code = "bad_request"


class ExecutionExists(SimulatorRequestError):
    """An ID that exists already (HTTP 409)."""

    status = 409
    code = "conflict"

"""What a status request can end in, other than a status: each row of the table in NOTES.md."""

from __future__ import annotations

from enum import StrEnum

from monitor.errors import ExecmonError


class ApiError(ExecmonError):
    """Base of every client outcome that is not a status record."""


class KeyRejected(ApiError):
    """401 or 403: the key is invalid, revoked or not allowed. Stop spending with it; report unhealthy.

    A 403 is treated like a 401: retrying a key the server refuses only burns the budget.
    """

    def __init__(self, status: int = 401) -> None:
        # No advice here: each front end says what to do (watch: which variable; the daemon: reload).
        super().__init__("the API key was rejected: " + ("forbidden (403)" if status == 403 else "401 unauthorized"))
        self.status = status


class ExecutionNotFound(ApiError):
    """404: unknown ID (a typo, or not visible yet right after creation)."""

    def __init__(self, execution_id: str) -> None:
        super().__init__(f"execution {execution_id} not found (404)")
        self.execution_id = execution_id


class Throttled(ApiError):
    """429: the whole key is throttled. `retry_after_s` is parsed from Retry-After and capped."""

    def __init__(self, retry_after_s: float | None) -> None:
        hint = f"retry after {retry_after_s:g} s" if retry_after_s is not None else "no Retry-After"
        super().__init__(f"rate limited by the server (429, {hint})")
        self.retry_after_s = retry_after_s


class TransientReason(StrEnum):
    """Why a request failed in a way that a retry may fix."""

    SERVER_ERROR = "server_error"  # 5xx
    TIMEOUT = "timeout"  # no complete answer within the request timeout
    CONNECTION = "connection"  # refused, reset, closed without an answer
    NOT_JSON = "not_json"  # 200 whose body is not JSON (or is truncated)
    BAD_SHAPE = "bad_shape"  # JSON, but not a status object
    TOO_LARGE = "too_large"  # body over the size cap
    UNEXPECTED_STATUS = "unexpected_status"  # any other HTTP status


class TransientError(ApiError):
    """A failure that a retry of that one execution may fix; carries its reason."""

    def __init__(self, reason: TransientReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

"""Input checks for the control API, mirroring `openapi.json` exactly.

Anything the OpenAPI document allows is accepted and anything it forbids is a 400 with a JSON
error, so that the schemathesis run (generated valid and invalid inputs) agrees with the server.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NoReturn

from monitor.ids import ALLOWED_DESCRIPTION, is_valid_execution_id

MAX_IDS = 10_000  # per request; the CLI splits bigger batches after checking every ID itself
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 1024
MAX_GROUP = 128
MAX_DEADLINE_S = 315_360_000  # ten years: anything longer is a typo
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_OFFSET = 1_000_000_000
SHOWN_ID_CHARS = 130
STATES = ("pending", "running", "completed", "failed", "cancelled", "not_found", "timed_out")
STATUS_FILTERS = (*STATES, "terminal", "active", "stalled")
TRACK_FIELDS = frozenset({"ids", "deadline_s", "labels", "group", "batch"})
_BATCH = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
LIST_PARAMETERS = frozenset({"status", "limit", "offset"})
_DIGITS = re.compile(r"[0-9]{1,12}")


class ErrorCode(StrEnum):
    """The `error.code` of every JSON error the control API returns."""

    BAD_REQUEST = "bad_request"  # a field or parameter has the wrong type or value
    INVALID_JSON = "invalid_json"  # the body is not JSON (NaN and Infinity are not JSON either)
    INVALID_IDS = "invalid_ids"  # one or more execution IDs outside the allowlist (all named)
    TOO_MANY_IDS = "too_many_ids"  # more than MAX_IDS in one request
    BODY_TOO_LARGE = "body_too_large"  # over [control] max_body_bytes
    UNAUTHORIZED = "unauthorized"  # missing or wrong bearer token
    FORBIDDEN_ORIGIN = "forbidden_origin"  # an Origin header of another origin (a web page)
    MISDIRECTED = "misdirected_request"  # a Host header that does not name the listener (DNS rebinding)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a body that is not Content-Type: application/json
    NOT_FOUND = "not_found"  # not tracked, or no such endpoint
    METHOD_NOT_ALLOWED = "method_not_allowed"  # e.g. PUT on /v1/executions
    UNAVAILABLE = "unavailable"  # starting or stopping
    INTERNAL = "internal"  # a bug: logged with its traceback


class ApiError(Exception):
    """An error answer: HTTP status, code, message and, for bad IDs, every bad ID."""

    def __init__(self, status: int, code: ErrorCode, message: str, invalid_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.invalid_ids = invalid_ids

    @classmethod
    def for_invalid_ids(cls, raw: list[object]) -> ApiError:
        shown = [_show(value) for value in raw]
        listed = ", ".join(repr(s) for s in shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        noun = "ID" if len(shown) == 1 else "IDs"
        message = f"{len(shown)} invalid execution {noun}: {listed}; allowed are {ALLOWED_DESCRIPTION}"
        return cls(400, ErrorCode.INVALID_IDS, message, invalid_ids=shown)


def _show(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= SHOWN_ID_CHARS else text[: SHOWN_ID_CHARS - 3] + "..."


def _bad(message: str) -> NoReturn:
    raise ApiError(400, ErrorCode.BAD_REQUEST, message)


@dataclass(frozen=True, slots=True)
class TrackRequest:
    ids: list[str]
    deadline_s: float | None = None
    group: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    batch: str | None = None  # continue this batch of `group` (a client splitting one call into chunks)


@dataclass(frozen=True, slots=True)
class ListQuery:
    status: str | None
    limit: int
    offset: int


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def decode_json(body: bytes) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity; any failure is a 400."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ApiError(400, ErrorCode.INVALID_JSON, f"the body is not valid JSON: {reason}") from None


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates, which JSON allows but UTF-8 (and SQLite) do not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ids(payload: Mapping[str, Any]) -> list[str]:
    if "ids" not in payload:
        _bad("'ids' is required: a list of execution IDs")
    raw = payload["ids"]
    if not isinstance(raw, list) or not raw:
        _bad("'ids' must be a non-empty list of execution IDs")
    if len(raw) > MAX_IDS:
        raise ApiError(400, ErrorCode.TOO_MANY_IDS, f"{len(raw)} IDs in one request; at most {MAX_IDS}")
    invalid = [value for value in raw if not (isinstance(value, str) and is_valid_execution_id(value))]
    if invalid:
        raise ApiError.for_invalid_ids(invalid)
    return list(dict.fromkeys(raw))  # duplicates count once, first position wins


def _deadline(payload: Mapping[str, Any]) -> float | None:
    raw = payload.get("deadline_s")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        _bad("'deadline_s' must be a number of seconds or null")
    value = float(raw)
    if not (math.isfinite(value) and 0 < value <= MAX_DEADLINE_S):
        _bad(f"'deadline_s' must be more than 0 and at most {MAX_DEADLINE_S} seconds")
    return value


def _group(payload: Mapping[str, Any]) -> str | None:
    raw = payload.get("group")
    if raw is None:
        return None
    if not isinstance(raw, str) or not 1 <= len(raw) <= MAX_GROUP or not _encodable(raw):
        _bad(f"'group' must be a string of 1 to {MAX_GROUP} characters or null")
    return raw


def _batch(payload: Mapping[str, Any]) -> str | None:
    raw = payload.get("batch")
    if raw is None:
        return None
    if not isinstance(raw, str) or not _BATCH.fullmatch(raw):
        _bad("'batch' must be 1 to 100 letters, digits or _.:- or null")
    return raw if payload.get("group") is not None else None  # a batch is one use of a group


def _labels(payload: Mapping[str, Any]) -> dict[str, str]:
    raw = payload.get("labels", {})
    if not isinstance(raw, dict):
        _bad("'labels' must be an object of string values")
    if len(raw) > MAX_LABELS:
        _bad(f"at most {MAX_LABELS} labels")
    for key, value in raw.items():
        if not 1 <= len(key) <= MAX_LABEL_KEY or not _encodable(key):
            _bad(f"label names are 1 to {MAX_LABEL_KEY} characters")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not _encodable(value):
            _bad(f"label {key[:40]!r}: values are strings of at most {MAX_LABEL_VALUE} characters")
    return dict(raw)


def parse_track_request(body: bytes) -> TrackRequest:
    """Validate a POST /v1/executions body; raises ApiError naming what is wrong."""
    payload = decode_json(body)
    if not isinstance(payload, dict):
        _bad("the body must be a JSON object with 'ids'")
    unknown = sorted(set(payload) - TRACK_FIELDS)
    if unknown:
        named = ", ".join(repr(k[:40]) for k in unknown[:5])
        _bad(f"unknown field(s): {named}; allowed are {', '.join(sorted(TRACK_FIELDS))}")
    return TrackRequest(
        ids=_ids(payload),
        deadline_s=_deadline(payload),
        group=_group(payload),
        labels=_labels(payload),
        batch=_batch(payload),
    )


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        _bad(f"'{name}' must be a whole number from {low} to {high}")
    return int(raw)


def check_query(query: Mapping[str, str], allowed: frozenset[str] = frozenset()) -> None:
    """Unknown query parameters are errors: `?state=running` must not silently list everything."""
    unknown = sorted(set(query) - allowed)
    if unknown:
        named = ", ".join(repr(k[:40]) for k in unknown[:5])
        accepted = ", ".join(sorted(allowed)) or "none"
        _bad(f"unknown query parameter(s): {named}; accepted here: {accepted}")


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """Validate GET /v1/executions parameters."""
    check_query(query, LIST_PARAMETERS)
    status = query.get("status")
    if status is not None and status not in STATUS_FILTERS:
        _bad(f"'status' must be one of {', '.join(STATUS_FILTERS)}")
    return ListQuery(
        status=status,
        limit=_int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        offset=_int_param(query, "offset", 0, 0, MAX_OFFSET),
    )

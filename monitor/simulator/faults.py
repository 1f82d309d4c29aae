"""Fault injection: a fraction of status requests dropped, answered 5xx, or answered with a broken body.

One uniform draw per request picks at most one fault, so the three fractions add up (they must
not exceed 1). The draws come from one generator seeded from the simulator's seed: the same
sequence of requests meets the same faults.
"""

from __future__ import annotations

import json
import random
from enum import StrEnum

from aiohttp import web


class Fault(StrEnum):
    """What happens to one status request."""

    NONE = "none"  # answered normally
    DROP = "dropped"  # connection closed without an answer
    ERROR = "5xx"  # 500, 502 or 503 with a small JSON or HTML body
    MALFORMED = "malformed"  # 200 with a non-JSON or truncated JSON body


_BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_MAINTENANCE_HTML = "<!DOCTYPE html><html><body><h1>Service Unavailable</h1><p>Back soon.</p></body></html>"


class FaultInjector:
    def __init__(self, seed: int, *, error_rate: float, malformed_rate: float, drop_rate: float) -> None:
        self._rng = random.Random(f"execmon-faults:{seed}")
        self._drop_below = drop_rate
        self._error_below = drop_rate + error_rate
        self._malformed_below = drop_rate + error_rate + malformed_rate
        self.active = self._malformed_below > 0

    def roll(self) -> Fault:
        if not self.active:
            return Fault.NONE
        point = self._rng.random()
        if point < self._drop_below:
            return Fault.DROP
        if point < self._error_below:
            return Fault.ERROR
        if point < self._malformed_below:
            return Fault.MALFORMED
        return Fault.NONE

    def error_response(self) -> web.Response:
        """A 500 or 503 with a JSON error, or a proxy's HTML 502/503 page."""
        kind = self._rng.randrange(4)
        if kind == 0:
            return _json(500, {"error": {"code": "internal_error", "message": "Internal server error"}})
        if kind == 1:
            return web.Response(status=502, text=_BAD_GATEWAY_HTML, content_type="text/html")
        if kind == 2:
            unavailable = {"code": "service_unavailable", "message": "Service temporarily unavailable"}
            return _json(503, {"error": unavailable})
        return web.Response(status=503, text=_MAINTENANCE_HTML, content_type="text/html")

    def malformed_response(self, body: bytes) -> web.Response:
        """A 200 whose body does not parse: the real one cut short, or an HTML page."""
        if self._rng.random() < 0.5 and len(body) > 2:
            cut = self._rng.randrange(1, len(body) - 1)
            return web.Response(status=200, body=body[:cut], content_type="application/json")
        return web.Response(status=200, text=_MAINTENANCE_HTML, content_type="application/json")


def _json(status: int, payload: object) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")

"""Prometheus metrics for the daemon, in a registry of their own.

Each `Metrics` owns a `CollectorRegistry` instead of using the process-global one, so that tests
(and embedders) can create as many engines as they like without "duplicated timeseries" errors.
The engine calls the small methods below; the control API serves `render()` at `/metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# Detection delay (end of an execution -> its result reached the sinks) spans seconds to hours.
# generate_latest writes the classic text format (our names need no escaping), which every
# Prometheus understands; newer clients label it "version=1.0.0", which older scrapers do not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DETECTION_DELAY_BUCKETS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


class Metrics:
    """Every series the daemon exposes. Methods are cheap and safe to call from the event loop."""

    def __init__(self, namespace: str = "execmon") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        ns = namespace
        self._requests = Counter(
            "api_requests",
            "Status requests to the vendor API, by outcome.",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self._request_children: dict[str, Counter] = {}
        self._throttled = Counter(
            "api_throttled", "Answers 429 (rate limited) from the vendor API.", namespace=ns, registry=reg
        )
        self._budget_used = Gauge(
            "budget_used", "Requests spent in the current rate-limit window.", namespace=ns, registry=reg
        )
        self._budget_free = Gauge(
            "budget_free",
            "Requests still allowed in the current rate-limit window.",
            namespace=ns,
            registry=reg,
        )
        self._tracked = Gauge(
            "executions_tracked",
            "Executions in the state store, by state.",
            ["state"],
            namespace=ns,
            registry=reg,
        )
        self._detection_delay = Histogram(
            "detection_delay_seconds",
            "Seconds from an execution's end (server time) to execmon seeing it (its result then enters the outbox).",
            namespace=ns,
            registry=reg,
            buckets=DETECTION_DELAY_BUCKETS,
        )
        self._deliveries = Counter(
            "sink_deliveries",
            "Deliveries to sinks, by sink and result.",
            ["sink", "result"],
            namespace=ns,
            registry=reg,
        )
        self._replica_executions = Gauge(
            "replica_executions",
            "PostgreSQL replicas: active executions each replica holds a lease on.",
            ["replica"],
            namespace=ns,
            registry=reg,
        )
        self._outbox_depth = Gauge(
            "outbox_depth", "Results waiting in the outbox for delivery.", namespace=ns, registry=reg
        )
        self._lane_depth = 0  # what the sinks' lanes hold ...
        self._orphaned = 0  # ... plus what waits for a sink that is not configured (no lane counts it)
        self._dead_letters = Gauge(
            "dead_letters", "Results that no sink could take after every retry.", namespace=ns, registry=reg
        )
        self._circuit_open = Gauge(
            "sink_circuit_open",
            "1 while a sink is paused after failing again and again (one probe at a time), else 0.",
            ["sink"],
            namespace=ns,
            registry=reg,
        )
        self._loop_lag = Gauge(
            "event_loop_lag_seconds",
            "How late a 0.1 s sleep on the event loop woke up.",
            namespace=ns,
            registry=reg,
        )
        self._store_healthy = Gauge(
            "state_store_healthy", "1 while the state store records, 0 while it is failing.", namespace=ns, registry=reg
        )
        self._store_healthy.set(1)
        self._store_faults = Counter(
            "state_store_faults", "Times the state store started failing (disk full, I/O error, busy).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self._loop_stalls = Counter(
            "event_loop_stalls", "Times the event loop was blocked longer than the stall threshold.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self._stalled = Gauge(
            "stalled_executions", "Running executions whose progress stands still (stall_after), by kind label.",
            ["kind"], namespace=ns, registry=reg,
        )  # fmt: skip

    def request(self, outcome: str) -> None:
        """One status request finished: the status it reported (running, completed, ...) or "error"."""
        child = self._request_children.get(outcome)
        if child is None:  # labels() is a locked lookup: once per outcome, then the child is reused
            child = self._request_children[outcome] = self._requests.labels(outcome=outcome)
        child.inc()

    def throttled(self) -> None:
        self._throttled.inc()

    def set_budget(self, used: int, free: float) -> None:  # free: inf without a limit
        self._budget_used.set(used)
        self._budget_free.set(free)

    def set_tracked(self, by_status: Mapping[str, int]) -> None:
        """Replace the whole per-state breakdown, so that a state that emptied drops to nothing."""
        self._tracked.clear()
        for state, count in by_status.items():
            self._tracked.labels(state=state).set(count)

    def observe_detection_delay(self, seconds: float) -> None:
        self._detection_delay.observe(max(0.0, seconds))

    def delivery(self, sink: str, result: str) -> None:
        """One delivery attempt to a sink ended (result such as ok, retry, dead_letter)."""
        self._deliveries.labels(sink=sink, result=result).inc()

    def set_outbox_depth(self, n: int) -> None:
        self._lane_depth = n
        self._outbox_depth.set(n + self._orphaned)

    def set_orphaned_outbox(self, n: int) -> None:
        """Rows pending for sinks no longer configured: part of outbox_depth, which alerts should see."""
        self._orphaned = n
        self._outbox_depth.set(self._lane_depth + n)

    def set_dead_letters(self, n: int) -> None:
        self._dead_letters.set(n)

    def set_circuit_open(self, sink: str, is_open: bool) -> None:
        self._circuit_open.labels(sink=sink).set(1 if is_open else 0)

    def set_loop_lag(self, seconds: float) -> None:
        self._loop_lag.set(max(0.0, seconds))

    def loop_stalled(self) -> None:
        self._loop_stalls.inc()

    def set_stalled(self, counts_by_kind: Mapping[str, int]) -> None:
        """Replace the whole per-kind breakdown, so that a kind with no stall left drops to nothing."""
        self._stalled.clear()
        for kind, count in counts_by_kind.items():
            self._stalled.labels(kind=kind).set(count)

    def set_replica_executions(self, counts_by_replica: Mapping[str, int]) -> None:
        """Replace the whole per-replica breakdown, so that a replica that left drops to nothing."""
        self._replica_executions.clear()
        for replica, count in counts_by_replica.items():
            self._replica_executions.labels(replica=replica).set(count)

    def set_store_healthy(self, healthy: bool) -> None:
        self._store_healthy.set(1 if healthy else 0)

    def store_fault(self) -> None:
        self._store_faults.inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE

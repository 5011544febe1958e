"""The gateway's own Prometheus metrics, served at its ``GET /metrics``.

Per-client service, queues, nodes and SLO attainment are the coordinator's
(``disagg serve --metrics-port``, ``disagg/coordinator/metrics.py``): the gateway sees
only its own share of the traffic, so it counts what is its own — requests by route and
status, time to the first streamed chunk and to the end as it saw them, streamed
tokens, and requests open now. No client label: the coordinator has those, bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from disagg.coordinator.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self, namespace: str = "disagg_http") -> None:
        self.registry = reg = CollectorRegistry()
        self.requests = Counter(
            "requests", "HTTP requests answered, by route and status.", ["route", "status"],
            namespace=namespace, registry=reg,
        )  # fmt: skip
        self.first_chunk = Histogram(
            "time_to_first_chunk_seconds",
            "Streamed requests: arrival at the gateway to the first output chunk.",
            namespace=namespace, registry=reg, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.duration = Histogram(
            "request_duration_seconds", "Arrival at the gateway to the last byte, by route.",
            ["route"], namespace=namespace, registry=reg, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.tokens = Counter(
            "streamed_tokens", "Output tokens relayed in streamed replies.",
            namespace=namespace, registry=reg,
        )  # fmt: skip
        self.open = Gauge(
            "open_requests", "Requests the gateway is serving now.",
            namespace=namespace, registry=reg,
        )  # fmt: skip

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

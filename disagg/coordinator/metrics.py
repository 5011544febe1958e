"""The coordinator's Prometheus metrics (names and labels: docs/operations.md).

Each ``CoordinatorMetrics`` owns a private ``CollectorRegistry``, so several can live in
one process (tests, or two coordinators). Every method is a dictionary lookup and an
increment: cheap enough to call per request and per charge on the hot path.

Label cardinality is bounded: the first ``max_clients`` distinct client ids get their
own series; later ones are reported together as ``client_id="_other"``.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

#: The label value that stands for every client past the cardinality cap.
OTHER_CLIENTS = "_other"

#: TTFT / TPOT buckets, seconds: 1 ms to 60 s, about three per decade.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
)

#: KV transfer time buckets, seconds: 100 µs (CUDA IPC, small requests) to 10 s.
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
TRANSFER_BUCKETS += (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Stage = Literal["prefill", "decode"]


class CoordinatorMetrics:
    """Everything the coordinator reports. ``clock`` is the time source of the SLO
    attainment window (injected by tests)."""

    def __init__(
        self,
        *,
        max_clients: int = 1000,
        slo_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        namespace: str = "disagg",
    ) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        if not slo_window_s > 0:
            raise ValueError(f"slo_window_s must be > 0, got {slo_window_s}")
        self.registry = CollectorRegistry()
        self._max_clients = max_clients
        self._clients: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._server: object | None = None
        reg, ns = self.registry, namespace

        self._arrived = Counter(
            "requests_arrived",
            "Generate requests received.",
            ["client_id"],
            namespace=ns,
            registry=reg,
        )
        self._rejected = Counter(
            "requests_rejected",
            "Requests refused before being queued (reason: unauthorized, rate_limit, queue_full, ...).",
            ["client_id", "reason"],
            namespace=ns,
            registry=reg,
        )
        self._finished = Counter(
            "requests_finished",
            "Requests that ended with a finished message (finish_reason: stop, length, abort).",
            ["client_id", "finish_reason"],
            namespace=ns,
            registry=reg,
        )
        self._failed = Counter(
            "requests_failed",
            "Accepted requests that ended in an error (code: failed, unavailable, ...).",
            ["client_id", "code"],
            namespace=ns,
            registry=reg,
        )
        self._ttft = _ClientHistogram(
            f"{ns}_ttft_seconds",
            "Time to first token: arrival at the coordinator to the first token sent.",
            LATENCY_BUCKETS,
        )
        self._tpot = _ClientHistogram(
            f"{ns}_tpot_seconds",
            "Time per output token after the first, averaged over each request.",
            LATENCY_BUCKETS,
        )
        reg.register(self._ttft)
        reg.register(self._tpot)
        self._service = Counter(
            "client_service",
            "Service charged to each client (cost units of h(n_in, n_out), before the weight): "
            "input at the prefill stage, output at the decode stage.",
            ["client_id", "stage"],
            namespace=ns,
            registry=reg,
        )
        self._counter = Gauge(
            "client_counter",
            "Merged two-stage VTC counter of each client (service / weight, lifts included).",
            ["client_id"],
            namespace=ns,
            registry=reg,
        )
        self._queue_depth = Gauge(
            "queue_depth", "Requests waiting, per pool.", ["pool"], namespace=ns, registry=reg
        )
        self._kv_bytes = Counter(
            "kv_transfer_bytes",
            "KV cache bytes moved prefill -> decode.",
            namespace=ns,
            registry=reg,
        )
        self._kv_seconds = Histogram(
            "kv_transfer_seconds",
            "Duration of each request's KV transfer.",
            namespace=ns,
            registry=reg,
            buckets=TRANSFER_BUCKETS,
        )
        self._preemptions = Counter(
            "preemptions",
            "Requests preempted (recompute) on a decode node.",
            ["node_id"],
            namespace=ns,
            registry=reg,
        )
        self._node_up = Gauge(
            "node_up",
            "1 while a node's heartbeats arrive, 0 once it is declared dead.",
            ["node_id", "role"],
            namespace=ns,
            registry=reg,
        )
        self._slo = Counter(
            "slo_requests",
            "Finished requests judged against the TTFT and TPOT SLOs (met: true, false).",
            ["client_id", "met"],
            namespace=ns,
            registry=reg,
        )
        self._attainment = _SlidingAttainment(slo_window_s, clock, f"{ns}_")
        reg.register(self._attainment)

    # -- requests ----------------------------------------------------------------------

    def request_arrived(self, client_id: str) -> None:
        self._child(self._arrived, self._label(client_id)).inc()

    def request_rejected(self, client_id: str, reason: str) -> None:
        self._child(self._rejected, self._label(client_id), reason).inc()

    def request_finished(
        self, client_id: str, finish_reason: str, ttft_s: float | None, tpot_s: float | None
    ) -> None:
        """``ttft_s`` is None when no token was made (aborted early); ``tpot_s`` is None
        for requests with fewer than two output tokens."""
        label = self._label(client_id)
        self._child(self._finished, label, finish_reason).inc()
        if ttft_s is not None:
            self._ttft.observe(label, ttft_s)
        if tpot_s is not None:
            self._tpot.observe(label, tpot_s)

    def request_failed(self, client_id: str, code: str) -> None:
        self._child(self._failed, self._label(client_id), code).inc()

    def slo_observed(self, client_id: str, met: bool) -> None:
        """One finished request met both SLOs (``met``) or not; feeds the counter and the
        sliding-window attainment gauge."""
        label = self._label(client_id)
        self._child(self._slo, label, "true" if met else "false").inc()
        self._attainment.observe(label, met)

    # -- fairness ----------------------------------------------------------------------

    def charge(self, client_id: str, stage: Stage, amount: float) -> None:
        """Service charged to ``client_id`` at ``stage`` (``amount`` >= 0)."""
        if stage not in ("prefill", "decode"):
            raise ValueError(f"stage must be 'prefill' or 'decode', got {stage!r}")
        self._child(self._service, self._label(client_id), stage).inc(amount)

    def set_counter(self, client_id: str, merged_value: float) -> None:
        """The client's merged counter. Clients past the cardinality cap are not
        reported: one gauge cannot stand for many clients' counters."""
        label = self._label(client_id)
        if label == client_id:
            self._child(self._counter, label).set(merged_value)

    # -- pools and nodes ---------------------------------------------------------------

    def set_queue_depth(self, pool: str, depth: int) -> None:
        self._child(self._queue_depth, pool).set(depth)

    def kv_transfer(self, nbytes: int, seconds: float) -> None:
        self._kv_bytes.inc(nbytes)
        self._kv_seconds.observe(seconds)

    def preemption(self, node_id: str) -> None:
        self._child(self._preemptions, node_id).inc()

    def set_node_alive(self, node_id: str, role: str, alive: bool) -> None:
        self._child(self._node_up, node_id, role).set(1 if alive else 0)

    # -- export ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition a scrape would get."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP exporter in a daemon thread; returns the bound port (``port=0``
        picks a free one). ``close`` stops it."""
        if self._server is not None:
            raise RuntimeError("the metrics exporter is already running")
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP exporter, if running."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: prometheus_client's lookup takes a lock and
        builds the key each time, and the coordinator calls this per request and token."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _label(self, client_id: str) -> str:
        clients = self._clients
        if client_id in clients:
            return client_id
        if len(clients) < self._max_clients:
            clients.add(client_id)
            return client_id
        return OTHER_CLIENTS


class _ClientHistogram(Collector):
    """A histogram by ``client_id``, exported as ``prometheus_client.Histogram`` exports
    one (buckets, count, sum, created), observed with one bisect and two additions: the
    coordinator observes two per finished request, and ``Histogram`` walks its buckets in
    Python, with a lock per bucket. Observations come from the coordinator's thread,
    scrapes from the exporter's."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = (*buckets, math.inf)
        self._lock = threading.Lock()
        # client -> [observations in each bucket (not cumulative) ..., sum]
        self._series: dict[str, list[float]] = {}
        self._created: dict[str, float] = {}

    def observe(self, client_id: str, amount: float) -> None:
        series = self._series.get(client_id)
        if series is None:
            with self._lock:
                series = self._series[client_id] = [0.0] * (len(self._bounds) + 1)
                self._created[client_id] = time.time()
        with self._lock:
            series[bisect_left(self._bounds, amount)] += 1  # the first bound >= amount
            series[-1] += amount

    def describe(self) -> Iterator[HistogramMetricFamily]:
        return iter([HistogramMetricFamily(self._name, self._documentation, labels=["client_id"])])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            snap = {c: (list(s), self._created[c]) for c, s in self._series.items()}
        family = HistogramMetricFamily(self._name, self._documentation, labels=["client_id"])
        for client_id, (series, created) in snap.items():
            cumulative, buckets = 0.0, []
            for bound, n in zip(self._bounds, series, strict=False):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([client_id], buckets, series[-1])
            family.samples.append(
                Sample(f"{self._name}_created", {"client_id": client_id}, created)
            )
        return iter([family])


class _SlidingAttainment(Collector):
    """Per client, the share of the SLO observations of the last ``window_s`` seconds
    that met the SLO. A client with no observation in the window has no series.
    Observations come from the coordinator's thread, scrapes from the exporter's."""

    def __init__(self, window_s: float, clock: Callable[[], float], prefix: str) -> None:
        self._window_s = window_s
        self._clock = clock
        self._prefix = prefix
        self._lock = threading.Lock()
        # client -> [(time, met)], oldest first; plus the count of met ones in it
        self._obs: dict[str, deque[tuple[float, bool]]] = {}
        self._met: dict[str, int] = {}

    def observe(self, client_id: str, met: bool) -> None:
        now = self._clock()
        with self._lock:
            window = self._obs.get(client_id)
            if window is None:
                window = self._obs[client_id] = deque()
                self._met[client_id] = 0
            window.append((now, met))
            self._met[client_id] += met
            self._evict(client_id, now)

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """client → (attainment, observations in the window)."""
        now = self._clock()
        with self._lock:
            for client_id in list(self._obs):
                self._evict(client_id, now)
            return {c: (self._met[c] / len(w), len(w)) for c, w in self._obs.items()}

    def _evict(self, client_id: str, now: float) -> None:
        window = self._obs[client_id]
        horizon = now - self._window_s
        while window and window[0][0] <= horizon:
            _, met = window.popleft()
            self._met[client_id] -= met
        if not window:  # forget idle clients: memory stays bounded by the window
            del self._obs[client_id]
            del self._met[client_id]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families({}))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(self.snapshot()))

    def _families(self, snap: dict[str, tuple[float, int]]) -> list[GaugeMetricFamily]:
        window = f"{self._window_s:g} s"
        attainment = GaugeMetricFamily(
            f"{self._prefix}slo_attainment",
            f"Share of requests finished in the last {window} that met both SLOs.",
            labels=["client_id"],
        )
        count = GaugeMetricFamily(
            f"{self._prefix}slo_window_requests",
            f"Requests judged against the SLOs in the last {window}.",
            labels=["client_id"],
        )
        for client_id, (share, n) in sorted(snap.items()):
            attainment.add_metric([client_id], share)
            count.add_metric([client_id], n)
        return [attainment, count]

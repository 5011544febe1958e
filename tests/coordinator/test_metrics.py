"""The coordinator's Prometheus metrics, read back from the text exposition."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from disagg.coordinator.metrics import OTHER_CLIENTS, CoordinatorMetrics


def samples(metrics: CoordinatorMetrics) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) → value, from what a scrape would read."""
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: CoordinatorMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_request_counters_and_latency_histograms():
    m = CoordinatorMetrics()
    for _ in range(3):
        m.request_arrived("alice")
    m.request_arrived("bob")
    m.request_rejected("bob", "queue_full")
    m.request_finished("alice", "stop", 0.02, 0.004)
    m.request_finished("alice", "length", 0.3, None)
    m.request_finished("alice", "abort", None, None)
    m.request_failed("alice", "unavailable")

    assert value(m, "disagg_requests_arrived_total", client_id="alice") == 3
    assert value(m, "disagg_requests_arrived_total", client_id="bob") == 1
    assert value(m, "disagg_requests_rejected_total", client_id="bob", reason="queue_full") == 1
    for reason in ("stop", "length", "abort"):
        assert (
            value(m, "disagg_requests_finished_total", client_id="alice", finish_reason=reason) == 1
        )
    assert value(m, "disagg_requests_failed_total", client_id="alice", code="unavailable") == 1

    assert value(m, "disagg_ttft_seconds_count", client_id="alice") == 2
    assert value(m, "disagg_ttft_seconds_sum", client_id="alice") == pytest.approx(0.32)
    assert value(m, "disagg_ttft_seconds_bucket", client_id="alice", le="0.001") == 0
    assert value(m, "disagg_ttft_seconds_bucket", client_id="alice", le="0.025") == 1
    assert value(m, "disagg_ttft_seconds_bucket", client_id="alice", le="0.5") == 2
    assert value(m, "disagg_ttft_seconds_bucket", client_id="alice", le="60.0") == 2
    assert value(m, "disagg_tpot_seconds_count", client_id="alice") == 1
    assert value(m, "disagg_tpot_seconds_bucket", client_id="alice", le="0.005") == 1
    assert value(m, "disagg_tpot_seconds_bucket", client_id="alice", le="0.0025") == 0


def test_service_counters_queue_depths_transfers_and_nodes():
    m = CoordinatorMetrics()
    m.charge("alice", "prefill", 100)
    m.charge("alice", "prefill", 28)
    m.charge("alice", "decode", 2)
    m.set_counter("alice", 130.5)
    m.set_counter("alice", 131.5)
    m.set_queue_depth("prefill", 7)
    m.set_queue_depth("decode", 2)
    m.set_queue_depth("prefill", 5)
    m.kv_transfer(4096, 0.002)
    m.kv_transfer(1024, 0.5)
    m.preemption("decode-0")
    m.preemption("decode-0")
    m.set_node_alive("prefill-0", "prefill", True)
    m.set_node_alive("decode-0", "decode", True)
    m.set_node_alive("decode-0", "decode", False)

    assert value(m, "disagg_client_service_total", client_id="alice", stage="prefill") == 128
    assert value(m, "disagg_client_service_total", client_id="alice", stage="decode") == 2
    assert value(m, "disagg_client_counter", client_id="alice") == 131.5
    assert value(m, "disagg_queue_depth", pool="prefill") == 5
    assert value(m, "disagg_queue_depth", pool="decode") == 2
    assert value(m, "disagg_kv_transfer_bytes_total") == 5120
    assert value(m, "disagg_kv_transfer_seconds_count") == 2
    assert value(m, "disagg_kv_transfer_seconds_sum") == pytest.approx(0.502)
    assert value(m, "disagg_kv_transfer_seconds_bucket", le="0.0025") == 1
    assert value(m, "disagg_preemptions_total", node_id="decode-0") == 2
    assert value(m, "disagg_node_up", node_id="prefill-0", role="prefill") == 1
    assert value(m, "disagg_node_up", node_id="decode-0", role="decode") == 0


def test_bad_stage_and_negative_charge_are_refused():
    m = CoordinatorMetrics()
    with pytest.raises(ValueError, match="stage"):
        m.charge("alice", "sampling", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.charge("alice", "decode", -1)


def test_instances_do_not_share_series():
    a, b = CoordinatorMetrics(), CoordinatorMetrics()
    a.request_arrived("alice")
    assert value(a, "disagg_requests_arrived_total", client_id="alice") == 1
    assert value(b, "disagg_requests_arrived_total", client_id="alice") is None


def test_client_ids_past_the_cap_are_reported_as_other():
    m = CoordinatorMetrics(max_clients=2)
    for client in ("a", "b", "c", "d", "a"):
        m.request_arrived(client)
        m.charge(client, "decode", 1)
        m.set_counter(client, 9)
        m.slo_observed(client, True)
    got = samples(m)
    arrived = {
        dict(labels)["client_id"]: v
        for (name, labels), v in got.items()
        if name == "disagg_requests_arrived_total"
    }
    assert arrived == {"a": 2, "b": 1, OTHER_CLIENTS: 2}
    assert value(m, "disagg_client_service_total", client_id=OTHER_CLIENTS, stage="decode") == 2
    assert value(m, "disagg_slo_window_requests", client_id=OTHER_CLIENTS) == 2
    # one gauge cannot stand for several clients' counters: overflow clients have none
    counters = {
        dict(labels)["client_id"] for (name, labels) in got if name == "disagg_client_counter"
    }
    assert counters == {"a", "b"}


def test_slo_attainment_over_a_sliding_window():
    clock = FakeClock()
    m = CoordinatorMetrics(slo_window_s=60.0, clock=clock)
    for met in (True, False, False, False):  # t = 1000: 1 of 4
        m.slo_observed("alice", met)
    clock.now += 30
    for met in (True, True, True, True):  # t = 1030: 4 of 4
        m.slo_observed("alice", met)
    m.slo_observed("bob", True)
    assert value(m, "disagg_slo_attainment", client_id="alice") == pytest.approx(5 / 8)
    assert value(m, "disagg_slo_window_requests", client_id="alice") == 8

    clock.now += 31  # t = 1061: the first four have left the window, at scrape time too
    assert value(m, "disagg_slo_attainment", client_id="alice") == 1.0
    assert value(m, "disagg_slo_window_requests", client_id="alice") == 4
    # the all-time counters keep everything
    assert value(m, "disagg_slo_requests_total", client_id="alice", met="true") == 5
    assert value(m, "disagg_slo_requests_total", client_id="alice", met="false") == 3

    clock.now += 60  # nothing left in the window: no attainment series at all
    assert value(m, "disagg_slo_attainment", client_id="alice") is None
    assert value(m, "disagg_slo_attainment", client_id="bob") is None
    m.slo_observed("alice", False)
    assert value(m, "disagg_slo_attainment", client_id="alice") == 0.0


def test_http_exporter_answers_on_an_ephemeral_port():
    m = CoordinatorMetrics()
    m.request_arrived("alice")
    port = m.serve(0, host="127.0.0.1")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'disagg_requests_arrived_total{client_id="alice"} 1.0' in body
        with pytest.raises(RuntimeError, match="already running"):
            m.serve(0, host="127.0.0.1")
    finally:
        m.close()
    m.close()  # idempotent


def test_the_latency_histograms_read_as_prometheus_client_histograms():
    """Bucket edges (a value on a bound counts in it), +Inf, count, sum: the text a scrape
    reads is what ``prometheus_client.Histogram`` writes for the same observations."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from disagg.coordinator.metrics import LATENCY_BUCKETS

    m, reg = CoordinatorMetrics(), CollectorRegistry()
    help_ = "Time to first token: arrival at the coordinator to the first token sent."
    ref = Histogram("ttft_seconds", help_, ["client_id"], namespace="disagg", registry=reg,
                    buckets=LATENCY_BUCKETS)  # fmt: skip
    for client, seconds in [("a", 0.0), ("a", 0.001), ("b", 0.0011), ("a", 70.0), ("b", 0.05)]:
        m.request_finished(client, "stop", seconds, None)
        ref.labels(client).observe(seconds)

    def ttft_lines(text: bytes) -> list[str]:
        return [x for x in text.decode().splitlines() if "ttft" in x and "_created{" not in x]

    assert ttft_lines(m.render()) == ttft_lines(generate_latest(reg))
    assert value(m, "disagg_ttft_seconds_created", client_id="a") is not None

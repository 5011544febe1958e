"""Colocated nodes in the served system: coordinator + colocated node processes + client.
Output equals the offline engine (itself checked against transformers); a heavy and a
light client share a node within single-stage VTC's bound; a node killed mid-stream
loses no request; a prefill node is refused by a colocated cluster, by name."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from disagg.coordinator.tracked import Phase
from disagg.deployment import MixedDeploymentError
from disagg.node.link import CoordinatorLink, RegistrationError
from disagg.protocol.cluster import Register
from disagg.serve import ServeOptions
from tests.runtime.conftest import start_cluster
from tests.runtime.test_failures import PROMPTS as SHORT_PROMPTS
from tests.runtime.test_failures import check_streams, stream_all
from tests.runtime.test_fairness_served import DURATION_S, MAX_TOKENS, W_IN, W_OUT, drive
from tests.runtime.test_served import expected, serve_all, workload


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    served = start_cluster(tmp_path_factory.mktemp("colocated"), prefill=0, decode=0, colocated=2)
    yield served
    served.stop(drain_timeout=5)


@pytest.mark.slow
def test_greedy_equals_offline_on_two_colocated_nodes(colocated, offline):
    jobs = workload(seed=2, n=16)  # three clients, concurrent, prompts across block edges
    done = asyncio.run(serve_all(colocated.client_address, jobs))
    assert [c.token_ids for c in done] == expected(offline, jobs)
    for c, (_, _, m) in zip(done, jobs, strict=True):
        assert c.finish_reason == "length" and len(c.token_ids) == m
        assert c.nodes.decode in ("colocated-0", "colocated-1")
        assert c.nodes.prefill == c.nodes.decode  # one node ran both phases
        assert c.timings.kv_transfer is None  # no KV moved
    # Input and output were charged to one counter per client, and nothing is left over.
    counters = colocated.coordinator.pools.prefill.ledger.counters()
    assert set(counters) == {"alice", "bob", "carol"} and min(counters.values()) > 0
    assert not colocated.coordinator.requests


def test_a_prefill_node_is_refused_by_a_colocated_cluster_by_name(colocated):
    node = next(iter(colocated.coordinator.nodes.values()))
    hello = Register(
        node_id="prefill-9", role="prefill", endpoint="prefill-9@0a", model=node_fingerprint(colocated),
        block_size=node.block_size, capacity_tokens=1024, max_model_len=node.max_model_len,
        max_batch_tokens=node.max_batch_tokens, pid=os.getpid(),
    )  # fmt: skip
    link = CoordinatorLink(colocated.node_address, "prefill-9")
    try:
        with pytest.raises(RegistrationError, match="never mixed"):
            link.register(hello, timeout=10)
    finally:
        link.close()
    assert "prefill-9" not in colocated.coordinator.nodes


def node_fingerprint(cluster) -> str:
    fingerprint = cluster.coordinator.core.model_fingerprint
    assert fingerprint is not None
    return fingerprint


def test_serve_options_refuse_a_mix_by_name():
    with pytest.raises(MixedDeploymentError, match="never mixed"):
        ServeOptions(colocated=2)  # prefill and decode default to 1 each
    assert ServeOptions(colocated=2, prefill=0, decode=0).colocated == 2


@pytest.mark.slow
def test_a_colocated_node_killed_mid_stream_loses_no_request(tmp_path, offline):
    """SIGKILL (no goodbye) while it streams: its requests resume on the other node from
    the tokens already sent; every stream has no gap or repeat and equals offline."""
    cluster = start_cluster(tmp_path, prefill=0, decode=0, colocated=2)
    try:
        jobs = [(SHORT_PROMPTS[i % 4], 80) for i in range(8)]
        moved: set[str] = set()

        def streaming_on_0(coordinator) -> bool:
            busy = [
                t
                for t in coordinator.requests.values()
                if t.phase is Phase.DECODING
                and t.decode_node == "colocated-0"
                and t.num_output_tokens > 3
            ]
            return len(busy) >= 2

        def kill() -> None:
            moved.update(
                t.request_id
                for t in cluster.coordinator.requests.values()
                if t.decode_node == "colocated-0"
            )
            cluster.kill_node("colocated-0")

        results = asyncio.run(stream_all(cluster, jobs, kill, streaming_on_0))
        assert all(not isinstance(r, BaseException) for r in results), results
        check_streams(results, jobs, offline)
        assert len(moved) >= 2
        finished_on = {done.request_id: done.nodes.decode for _, done in results}
        assert all(finished_on[rid] == "colocated-1" for rid in moved)
        assert not cluster.coordinator.nodes["colocated-0"].alive
        # Each request's input was charged once and each token once, resumed or not.
        want = {}
        for client in {f"c{len(p) % 3}" for p, _ in jobs}:
            mine = [done for (_, done), (p, _) in zip(results, jobs, strict=True)
                    if f"c{len(p) % 3}" == client]  # fmt: skip
            want[(client, "prefill")] = W_IN * sum(len(d.prompt_token_ids) for d in mine)
            want[(client, "decode")] = W_OUT * sum(len(d.token_ids) for d in mine)
        # (the metrics take the coordinator's charges once per tick: wait for the next)
        deadline = time.monotonic() + 5.0
        while service_charged(cluster, want) != pytest.approx(want) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service_charged(cluster, want) == pytest.approx(want)
    finally:
        cluster.stop(drain_timeout=5)


def service_charged(cluster, keys) -> dict[tuple[str, str], float]:
    """(client, stage) -> service charged, from the coordinator's Prometheus counters,
    for each of ``keys`` (0 when not charged yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(cluster.metrics.render().decode()):
        for sample in family.samples:
            if sample.name.endswith("client_service_total"):
                out[(sample.labels["client_id"], sample.labels["stage"])] = sample.value
    return {key: out.get(key, 0.0) for key in keys}


def single_stage_bound(longest_prompt: int, total_service: float, publish_interval: float):
    """VTC's bound for two backlogged clients on one server (Sheng et al., OSDI '24,
    Theorem 4.1: 2·U, U the most service one admission can bring), here
    2·(w_in·L_in + w_out·(M + 1)) with M = one slot of MAX_TOKENS, plus 2·S for the
    node ordering its queue by published counters: S = the service charged between
    publications (the interval plus a message delay of the same size, at the measured
    rate)."""
    s = (total_service / DURATION_S) * 2 * publish_interval
    return 2 * (W_IN * longest_prompt + W_OUT * (MAX_TOKENS + 1)) + 2 * s


@pytest.fixture(scope="module", params=["fcfs", "vtc"])
def fairness_run(request, tmp_path_factory):
    cluster = start_cluster(
        tmp_path_factory.mktemp(f"colocated-{request.param}"),
        prefill=0, decode=0, colocated=1, policy=request.param, max_num_seqs=1,
    )  # fmt: skip
    try:
        served, longest = asyncio.run(drive(cluster.client_address))
        interval = cluster.coordinator.settings.publish_interval_s
    finally:
        cluster.stop(drain_timeout=5)
    total = sum(served.values())
    floor = 0.5 - single_stage_bound(longest, total, interval) / total
    return request.param, served["light"] / total, floor, served


@pytest.mark.slow
def test_light_client_share_on_a_colocated_node(fairness_run):
    policy, share, floor, served = fairness_run
    assert 0 < floor < 0.5, (floor, served)  # the run was long enough for the bound to bite
    if policy == "vtc":
        assert share >= floor, (share, floor, served)
    else:
        assert share < floor, (share, floor, served)  # FCFS: visibly not fair


def parse_serve(argv: list[str]) -> ServeOptions:
    import argparse

    from disagg.serve_cli import add_serve_arguments, serve_options

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return serve_options(p.parse_args(argv))


def test_serve_command_line_colocated_and_deployment(tmp_path):
    from disagg.deployment import parse_deployment, save_deployment

    o = parse_serve(["--colocated", "3"])
    assert (o.prefill, o.decode, o.colocated) == (0, 0, 3)
    assert (parse_serve([]).prefill, parse_serve([]).decode) == (1, 1)
    with pytest.raises(MixedDeploymentError, match="never mixed"):
        parse_serve(["--colocated", "2", "--prefill", "1"])
    dep = parse_deployment(
        {"colocated": {"instances": 2},
         "nodes": [{"role": "colocated", "index": 0}, {"role": "colocated", "index": 1}]}
    )  # fmt: skip
    save_deployment(dep, tmp_path / "c.yaml")
    o = parse_serve(["--deployment", str(tmp_path / "c.yaml")])
    assert (o.prefill, o.decode, o.colocated) == (0, 0, 2)

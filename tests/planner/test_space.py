"""The candidate space: layouts, packing onto nodes, affinity rules, device assignment."""

from __future__ import annotations

from disagg.planner.space import (
    Cluster,
    Deployment,
    PhaseConfig,
    assign_devices,
    colocated_deployments,
    disaggregated_deployments,
    pack,
    valid_tp,
)


def test_tp_divides_heads_and_fits_a_node():
    assert valid_tp(40, 40, 8) == [1, 2, 4, 5, 8]
    # 8 KV heads: tp 16 would replicate each KV head twice, but it exceeds the node.
    assert valid_tp(64, 8, 8) == [1, 2, 4, 8]
    assert valid_tp(64, 8, 16) == [1, 2, 4, 8, 16]


def test_pack_keeps_each_group_inside_a_node():
    cluster = Cluster(2, 4)
    assert pack([(4, 0), (2, 1), (2, 2)], cluster) == [[0, 0, 0, 0], [1, 1, 2, 2]]
    assert pack([(3, 0), (3, 1), (2, 2)], cluster) is None  # 8 GPUs, but a 2 cannot split


def _no_gpu_twice(d: Deployment, cluster: Cluster) -> None:
    seen = set()
    for _, _, gpus in assign_devices(d, cluster):
        for node, gpu in gpus:
            assert 0 <= node < cluster.nodes and 0 <= gpu < cluster.gpus_per_node
            assert (node, gpu) not in seen
            seen.add((node, gpu))
    assert len(seen) == d.gpus


def test_high_affinity_space_fits_the_cluster():
    cluster = Cluster(2, 4)
    configs = [PhaseConfig(1, 1), PhaseConfig(2, 1), PhaseConfig(4, 1), PhaseConfig(2, 2)]
    deps = disaggregated_deployments(configs, configs, cluster, "high")
    assert deps
    assert all(d.gpus <= cluster.gpus for d in deps)
    assert Deployment(PhaseConfig(4, 1), 1, PhaseConfig(4, 1), 1) in deps
    assert Deployment(PhaseConfig(1, 1), 7, PhaseConfig(1, 1), 1) in deps
    for d in deps:
        _no_gpu_twice(d, cluster)


def test_low_affinity_pairs_stages_on_one_node():
    cluster = Cluster(4, 4)
    configs = [PhaseConfig(1, 1), PhaseConfig(2, 1), PhaseConfig(1, 2), PhaseConfig(2, 2)]
    deps = disaggregated_deployments(configs, configs, cluster, "low")
    assert deps
    for d in deps:
        assert d.prefill.pp == d.decode.pp
        assert d.n_prefill * d.prefill.tp + d.n_decode * d.decode.tp <= 4
        assert d.replicas == 4 // d.prefill.pp
        _no_gpu_twice(d, cluster)
        # every instance has one stage on each of its group's nodes, at the same GPUs
        for _, _, gpus in assign_devices(d, cluster):
            nodes = sorted({n for n, _ in gpus})
            assert len(nodes) == d.prefill.pp


def test_colocated_space():
    deps = colocated_deployments([PhaseConfig(1, 1), PhaseConfig(4, 1)], Cluster(1, 4))
    assert [(d.prefill.tp, d.n_prefill) for d in deps] == [(1, 1), (1, 2), (1, 3), (1, 4), (4, 1)]
    assert all(d.colocated for d in deps)

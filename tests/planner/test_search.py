"""The search returns what an exhaustive search over the same space returns, and the
pieces it stands on (pipeline latency, strict attainment, the grid) behave."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from disagg.planner.goodput import (
    Evaluator,
    InstanceLatency,
    LatencySource,
    RateGrid,
    SLOTarget,
    lowest_feasible,
)
from disagg.planner.plan import PlanRequest, phase_configs, plan
from disagg.planner.presets import load_plan_workload, resolve_gpu, resolve_model
from disagg.planner.search import Scorer, SearchStats, branch_and_bound, exhaustive, top_rate
from disagg.planner.space import (
    Cluster,
    PhaseConfig,
    colocated_deployments,
    disaggregated_deployments,
)
from disagg.sim.latency import load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILE = load_profile(ROOT / "bench" / "profiles" / "distserve_opt13b_a100.json")


def _setup(model, gpu, cluster, slo, workload, profile=None, affinity="high", requests=80):
    w = load_plan_workload(workload, requests)
    req = PlanRequest(resolve_model(model), resolve_gpu(gpu), cluster, slo, w, "fcfs")
    source = LatencySource(req.model, req.gpu, profile)
    configs, _ = phase_configs(req, source)
    ev = Evaluator(
        w, source, slo, "fcfs", req.gpu.intra_node_bandwidth, req.gpu.inter_node_bandwidth
    )
    deps = disaggregated_deployments(configs, configs, cluster, affinity)
    scorer = Scorer(ev, RateGrid(1.0, 1.05))
    scorer.grid = RateGrid(top_rate(scorer, deps), 1.05)
    return scorer, deps, configs


@pytest.mark.parametrize(
    ("model", "gpu", "cluster", "slo", "workload", "profile", "affinity"),
    [
        (
            "opt-13b",
            "a100-80g",
            Cluster(1, 4),
            SLOTarget(0.25, 0.1, 0.9),
            "chatbot-like",
            PROFILE,
            "high",
        ),
        (
            "llama-2-7b",
            "l4",
            Cluster(1, 4),
            SLOTarget(1.0, 0.08, 0.9),
            "summarization-like",
            None,
            "high",
        ),
        (
            "llama-3-8b",
            "a10g",
            Cluster(2, 4),
            SLOTarget(0.5, 0.06, 0.8),
            "code-completion-like",
            None,
            "low",
        ),
    ],
    ids=["opt13b-profile", "llama2-l4-summaries", "llama3-a10g-low-affinity"],
)
def test_branch_and_bound_equals_exhaustive(model, gpu, cluster, slo, workload, profile, affinity):
    scorer, deps, _ = _setup(model, gpu, cluster, slo, workload, profile, affinity)
    assert len(deps) >= 4
    stats = SearchStats()
    fast = branch_and_bound(scorer, deps, stats)
    full = exhaustive(scorer, deps)
    assert full is not None and fast is not None
    assert fast.per_gpu_goodput == full.per_gpu_goodput
    assert stats.simulated < len(deps)  # it did prune
    # the chosen deployment really meets the target at its goodput
    assert fast.outcome.attainment >= slo.attainment


def test_colocated_search_equals_exhaustive():
    scorer, _, configs = _setup(
        "opt-13b", "a100-80g", Cluster(1, 4), SLOTarget(0.25, 0.1, 0.9), "chatbot-like", PROFILE
    )
    colo = colocated_deployments(configs, Cluster(1, 4))
    assert (
        branch_and_bound(scorer, colo).per_gpu_goodput == exhaustive(scorer, colo).per_gpu_goodput
    )


def test_pipeline_decode_is_micro_batched_and_prefill_keeps_throughput():
    base, whole = PROFILE.model(1, 2), PROFILE.model(1, 1)
    lat = InstanceLatency(base, whole, base.kv_capacity_tokens)
    # a pp=2 decode step of 64 sequences: 32-sequence micro-batches through the whole model
    assert lat.decode_time(64, 64 * 500) == pytest.approx(whole.decode_time(32, 32 * 500))
    assert lat.decode_time(64, 64 * 500) > whole.decode_time(64, 64 * 500) / 2
    assert lat.prefill_time(512, 512**2, 1) == pytest.approx(whole.prefill_time(512, 512**2, 1) / 2)
    assert lat.kv_capacity_tokens == PROFILE.tp["1"].kv_capacity_tokens_by_pp["2"]


def test_ttft_counts_every_pipeline_stage():
    """A lone request on a pp=2 prefill instance waits for both stages: its TTFT is the
    whole model's prefill time, not half of it."""
    w = load_plan_workload("chatbot-like", 20)
    slo = SLOTarget(10.0, 10.0, 0.9)
    src = LatencySource(resolve_model("opt-13b"), resolve_gpu("a100-80g"), PROFILE)
    ev = Evaluator(w, src, slo, "fcfs", 300e9, 300e9)
    from disagg.planner.space import Deployment

    d1 = Deployment(PhaseConfig(1, 1), 1, PhaseConfig(1, 1), 1)
    d2 = Deployment(PhaseConfig(1, 2), 1, PhaseConfig(1, 1), 1)
    low_rate = 0.01  # nobody queues
    one, two = ev.run(d1, low_rate), ev.run(d2, low_rate)
    assert two.ttft_p90 == pytest.approx(one.ttft_p90, rel=0.02)


def test_strict_attainment_needs_both_slos():
    w = load_plan_workload("chatbot-like", 50)
    src = LatencySource(resolve_model("opt-13b"), resolve_gpu("a100-80g"), PROFILE)
    from disagg.planner.space import Deployment

    d = Deployment(PhaseConfig(1, 1), 1, PhaseConfig(1, 1), 1)
    loose = Evaluator(w, src, SLOTarget(10, 10, 0.9), "fcfs", 300e9, 300e9).run(d, 0.5)
    ttft_only = Evaluator(w, src, SLOTarget(10, 0.001, 0.9), "fcfs", 300e9, 300e9)
    assert loose.attainment == 1.0
    assert ttft_only.run(d, 0.5).attainment == 0.0  # every TTFT met, no TPOT
    assert ttft_only.run(d, 0.5, "ttft").attainment == 1.0  # the phase-alone check


def test_grid_and_bisection():
    grid = RateGrid(10.0, 1.1, 100.0)
    assert grid.rate(0) == 10.0
    assert grid.index_at_most(10.0) == 0
    assert grid.rate(grid.index_at_most(5.0)) <= 5.0 < grid.rate(grid.index_at_most(5.0) - 1)
    assert grid.index_at_most(0.0) == grid.size
    calls = []

    def feasible(k):
        calls.append(k)
        return k >= 17

    assert lowest_feasible(feasible, 0, grid.size - 1) == 17
    assert len(calls) <= 2 + grid.size.bit_length()
    assert lowest_feasible(lambda k: False, 0, 10) is None


@pytest.mark.parametrize(
    ("cluster", "profile", "model", "gpu", "slo", "workload"),
    [
        (Cluster(2, 4), PROFILE, "opt-13b", "a100-80g", SLOTarget(0.25, 0.1, 0.9), "chatbot-like"),
        (Cluster(2, 4), None, "llama-3-8b", "a10g", SLOTarget(0.5, 0.06, 0.8), "code-completion-like"),
    ],
    ids=["opt13b-profile", "llama3-a10g"],
)  # fmt: skip
def test_the_fewest_gpus_for_a_rate_equal_a_brute_force_over_the_space(
    cluster, profile, model, gpu, slo, workload
):
    """``--rate`` sizing: the smallest GPU count at which any deployment of the space
    (any phase configs) has the fluid capacity for the rate and meets the target there
    in simulation — what trying every candidate finds."""
    w = load_plan_workload(workload, 80)
    req = PlanRequest(resolve_model(model), resolve_gpu(gpu), cluster, slo, w, "fcfs")
    full = plan(req)
    # A quarter of the best: the sizing reuses what the search learnt of each phase alone,
    # assuming attainment falls as the rate rises, which with 80 requests holds only away
    # from the target (opt-13b, one tp-1 prefill instance alone: 0.8875 at 12.18 req/s
    # but 0.9 at 13.11, where 0.3 of the best lands).
    rate = round(full.best.per_gpu_goodput * full.best.deployment.gpus * 0.25, 3)
    sized, outcome = plan(replace(req, rate=rate)).sized
    scorer, deps, _ = _setup(model, gpu, cluster, slo, workload, profile, full.affinity, 80)

    def serves(d) -> bool:
        copy_rate = rate / d.replicas
        return scorer.capacity(d) >= copy_rate and scorer.evaluator.meets(d, copy_rate)

    assert min(d.gpus for d in deps if serves(d)) == sized.gpus
    assert sized.gpus < full.best.deployment.gpus and outcome.attainment >= slo.attainment
    assert scorer.capacity(sized) >= rate / sized.replicas  # a finite run cannot hide a queue

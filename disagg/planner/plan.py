"""``plan()``: from a model, a GPU, a cluster, SLOs and a workload to the best
disaggregated deployment and the best colocated one, or to a :class:`PlanImpossible`
that says what comes closest and why it fails."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from disagg.errors import ConfigError, DisaggError
from disagg.planner.goodput import (
    Evaluator,
    InstanceLatency,
    LatencySource,
    RateGrid,
    SLOTarget,
)
from disagg.planner.presets import PlanWorkload
from disagg.planner.search import (
    Scored,
    Scorer,
    SearchStats,
    branch_and_bound,
    top_rate,
)
from disagg.planner.space import (
    Affinity,
    Cluster,
    Deployment,
    PhaseConfig,
    colocated_deployments,
    disaggregated_deployments,
    divisors,
    valid_tp,
)
from disagg.sim.latency import LatencyProfile
from disagg.sim.presets import GpuSpec, ModelShape


class PlanImpossible(DisaggError):
    """No deployment meets the request; the message says what is closest and why."""


@dataclass(frozen=True)
class PlanRequest:
    model: ModelShape
    gpu: GpuSpec
    cluster: Cluster
    slo: SLOTarget
    workload: PlanWorkload
    policy: str = "two-stage-vtc"
    affinity: str = "auto"  # high | low | auto
    profile: LatencyProfile | None = None
    rate: float | None = None  # req/s the deployment must serve, if given
    grid_step: float = 1.02  # goodput resolution: 2 %


@dataclass
class PlanResult:
    request: PlanRequest
    affinity: Affinity
    affinity_reason: str
    best: Scored
    colocated: Scored | None
    configs: list[PhaseConfig]
    excluded: dict[PhaseConfig, str]
    search_seconds: float
    simulations: int
    stats: SearchStats = field(default_factory=SearchStats)
    at_rate: object | None = None  # Outcome at request.rate, when given
    # With a rate: the fewest GPUs that serve it, and its Outcome there (None: only the
    # whole best deployment does).
    sized: tuple[Deployment, object] | None = None

    @property
    def ratio(self) -> float | None:
        if self.colocated is None or self.colocated.per_gpu_goodput == 0:
            return None
        return self.best.per_gpu_goodput / self.colocated.per_gpu_goodput


def choose_affinity(req: PlanRequest) -> tuple[Affinity, str]:
    """``auto``: high when a mean prompt's KV crosses one GPU's network link within the
    TPOT SLO (a transfer then costs at most about one decode step), else low. One node
    has no network between its GPUs, so it is high (every layout allowed)."""
    if req.affinity in ("high", "low"):
        return req.affinity, "as asked"  # type: ignore[return-value]
    if req.cluster.nodes == 1:
        return "high", "one node: every transfer stays inside it"
    kv = req.workload.mean_prompt * req.model.kv_bytes_per_token
    seconds = kv / req.gpu.inter_node_bandwidth
    verdict = "high" if seconds <= req.slo.tpot else "low"
    return verdict, (
        f"a mean prompt's KV ({kv / 1e6:.0f} MB) crosses one GPU's network link "
        f"({req.gpu.inter_node_bandwidth * 8 / 1e9:.1f} Gb/s) in {seconds * 1e3:.1f} ms, "
        f"{'within' if verdict == 'high' else 'beyond'} the TPOT SLO of {req.slo.tpot * 1e3:.0f} ms"
    )


def phase_configs(
    req: PlanRequest, source: LatencySource
) -> tuple[list[PhaseConfig], dict[PhaseConfig, str]]:
    """Layouts that can serve the workload, and why each other one cannot."""
    shape, cluster = req.model, req.cluster
    need = req.workload.max_total
    ok: list[PhaseConfig] = []
    excluded: dict[PhaseConfig, str] = {}
    for tp in valid_tp(shape.num_heads, shape.num_kv_heads, cluster.gpus_per_node):
        for pp in divisors(shape.num_layers):
            c = PhaseConfig(tp, pp)
            if c.gpus > cluster.gpus:
                continue
            lat = source.instance(c)
            if isinstance(lat, str):
                excluded[c] = lat
            elif lat.kv_capacity_tokens < need:
                excluded[c] = (
                    f"{c} holds {lat.kv_capacity_tokens} KV tokens, fewer than the "
                    f"workload's longest request ({need} tokens)"
                )
            else:
                ok.append(c)
    return ok, excluded


def plan(req: PlanRequest) -> PlanResult:
    t0 = time.perf_counter()
    source = LatencySource(req.model, req.gpu, req.profile)
    configs, excluded = phase_configs(req, source)
    if not configs:
        raise PlanImpossible(_no_layout_fits(req, excluded))
    affinity, why = choose_affinity(req)
    inter = req.gpu.intra_node_bandwidth if req.cluster.nodes == 1 else req.gpu.inter_node_bandwidth
    evaluator = Evaluator(
        req.workload, source, req.slo, req.policy, req.gpu.intra_node_bandwidth, inter
    )
    disagg = disaggregated_deployments(configs, configs, req.cluster, affinity)
    if not disagg and affinity == "low":
        affinity, why = "high", "no low-affinity layout fits (prefill and decode need the same pp)"
        disagg = disaggregated_deployments(configs, configs, req.cluster, "high")
    colo = colocated_deployments(configs, req.cluster)
    if not disagg:
        raise PlanImpossible(
            f"no disaggregated layout fits {req.cluster.nodes} x {req.cluster.gpus_per_node} "
            f"GPUs: the smallest instance takes {min(c.gpus for c in configs)} GPUs and "
            f"prefill and decode need one each; give more GPUs"
        )
    scorer = Scorer(evaluator, RateGrid(1.0, req.grid_step))
    scorer.grid = RateGrid(top_rate(scorer, disagg + colo), req.grid_step)
    stats = SearchStats()
    best = branch_and_bound(scorer, disagg, stats)
    colocated = branch_and_bound(scorer, colo, SearchStats()) if colo else None
    if best is None:
        raise PlanImpossible(_no_layout_meets(req, scorer, disagg, configs, source))
    result = PlanResult(
        req,
        affinity,
        why,
        best,
        colocated,
        configs,
        excluded,
        time.perf_counter() - t0,
        evaluator.simulations,
        stats,
    )
    if req.rate is not None:
        _check_rate(req, result, evaluator)
        result.sized = _fewest_gpus_for_rate(req, result, scorer, disagg)
        result.search_seconds = time.perf_counter() - t0
    return result


def _check_rate(req: PlanRequest, result: PlanResult, evaluator: Evaluator) -> None:
    d = result.best.deployment
    rate = req.rate
    assert rate is not None
    most = result.best.per_gpu_goodput * d.gpus
    if rate > most * (1 + 1e-9):
        need = rate / result.best.per_gpu_goodput
        raise PlanImpossible(
            f"{rate:g} req/s needs more GPUs than the cluster has: the best layout, "
            f"{d.describe()}, serves {most:.2f} req/s on {d.gpus} GPUs at "
            f"{req.slo.attainment:.0%} attainment ({result.best.per_gpu_goodput:.3f} req/s "
            f"per GPU), so {rate:g} req/s needs about {need:.0f} GPUs; the cluster has "
            f"{req.cluster.gpus}. Lower --rate, add nodes, or relax the SLOs"
        )
    result.at_rate = evaluator.run(d, rate / d.replicas)


def _fewest_gpus_for_rate(
    req: PlanRequest, result: PlanResult, scorer: Scorer, candidates: list[Deployment]
) -> tuple[Deployment, object] | None:
    """The deployment with the fewest GPUs that serves ``req.rate``, over the whole
    search space (any phase configs, instance counts and, at low affinity, node groups),
    smallest GPU count first; among those of the first count that meet the target, the
    one with the most attainment. A candidate is simulated whole only if its fluid
    capacity reaches the rate and each phase meets its SLO alone (cached per phase
    config and count). Sizes below rate / (the best goodput per GPU) cannot meet it and
    are not tried (10 % slack for the rate grid)."""
    rate = req.rate
    assert rate is not None
    least = 0.9 * rate / result.best.per_gpu_goodput
    sized = sorted((d for d in candidates if d.gpus >= least), key=lambda d: d.gpus)
    for _, same_size in itertools.groupby(sized, key=lambda d: d.gpus):
        meeting = [
            (scorer.evaluator.run(d, rate / d.replicas), d)  # cached by serves()
            for d in same_size
            if scorer.serves(d, rate / d.replicas)
        ]
        if meeting:
            outcome, d = max(meeting, key=lambda od: od[0].attainment)
            return d, outcome
    return None


def _no_layout_fits(req: PlanRequest, excluded: dict[PhaseConfig, str]) -> str:
    if not excluded:
        return (
            f"no tp x pp layout of {req.model.name} fits {req.cluster.gpus} GPUs "
            f"(tp must divide {req.model.num_heads} heads, pp {req.model.num_layers} layers)"
        )
    largest = max(excluded, key=lambda c: (c.gpus, c.tp))
    return (
        f"{req.model.name} does not fit on {req.cluster.nodes} x {req.cluster.gpus_per_node} "
        f"{req.gpu.name}: no tp x pp layout leaves room for the workload's longest request "
        f"({req.workload.max_total} tokens). Closest, the largest layout tried: "
        f"{excluded[largest]}. Use more or larger GPUs"
    )


def _no_layout_meets(
    req: PlanRequest,
    scorer: Scorer,
    deployments: list[Deployment],
    configs: list[PhaseConfig],
    source: LatencySource,
) -> str:
    """What comes closest when no deployment meets the SLOs even at the lowest rate."""
    w, slo = req.workload, req.slo
    low = scorer.grid.rate(scorer.grid.size - 1)
    # The fastest single request each phase can do, on the fastest layout.
    best_ttft = min(_lone_ttft(source.instance(c), w) for c in configs)
    best_tpot = min(_lone_tpot(source.instance(c), w) for c in configs)
    closest = max(
        deployments[:: max(1, len(deployments) // 50)],  # a sample: the message, not the plan
        key=lambda d: scorer.evaluator.run(d, low * d.unit_gpus).attainment,
    )
    att = scorer.evaluator.run(closest, low * closest.unit_gpus)
    reasons = []
    if best_ttft > slo.ttft:
        reasons.append(
            f"a lone mean prompt ({w.mean_prompt:.0f} tokens) takes {best_ttft * 1e3:.0f} ms "
            f"to its first token on the fastest layout, above the TTFT SLO of "
            f"{slo.ttft * 1e3:.0f} ms"
        )
    if best_tpot > slo.tpot:
        reasons.append(
            f"one decode step of a lone request takes {best_tpot * 1e3:.1f} ms on the fastest "
            f"layout, above the TPOT SLO of {slo.tpot * 1e3:.1f} ms"
        )
    if not reasons:
        reasons.append(
            f"the workload's long requests miss the SLOs even alone: only "
            f"{att.attainment:.0%} of requests can meet both"
        )
    return (
        f"no layout meets TTFT {slo.ttft:g} s and TPOT {slo.tpot:g} s for "
        f"{slo.attainment:.0%} of requests, even at {low * closest.unit_gpus:.3g} req/s. "
        f"Closest: {closest.describe()}, {att.attainment:.1%} attainment "
        f"(P90 TTFT {_ms(att.ttft_p90)}, P90 TPOT {_ms(att.tpot_p90)}). Why: "
        + "; ".join(reasons)
        + ". Relax the SLOs or the attainment target, or use faster GPUs"
    )


def _lone_ttft(lat: InstanceLatency | str, w: PlanWorkload) -> float:
    assert not isinstance(lat, str)
    n = round(w.mean_prompt)
    return lat.prefill_time(n, n * n, 1) * lat.pp  # a lone batch passes every stage


def _lone_tpot(lat: InstanceLatency | str, w: PlanWorkload) -> float:
    assert not isinstance(lat, str)
    return lat.decode_time(1, round(w.mean_prompt))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def check_request(req: PlanRequest) -> None:
    """Input errors a user can fix, before any search."""
    if req.cluster.nodes < 1:
        raise ConfigError("nodes", f"must be >= 1, got {req.cluster.nodes}")
    if req.cluster.gpus_per_node < 1:
        raise ConfigError("gpus_per_node", f"must be >= 1, got {req.cluster.gpus_per_node}")
    for name, value in (("ttft_slo", req.slo.ttft), ("tpot_slo", req.slo.tpot)):
        if not value > 0:
            raise ConfigError(name, f"must be > 0 seconds, got {value}")
    if not 0 < req.slo.attainment <= 1:
        raise ConfigError("attainment", f"must be in (0, 1], got {req.slo.attainment}")
    if req.rate is not None and not req.rate > 0:
        raise ConfigError("rate", f"must be > 0 req/s, got {req.rate}")
    if req.gpu.name == "cpu" and req.profile is None:
        raise ConfigError(
            "latency_profile",
            "planning CPU nodes needs a fitted profile: run `disagg profile --device cpu "
            "-o profile.json` and pass --latency-profile profile.json (there is no CPU roofline)",
        )
    if req.affinity not in ("high", "low", "auto"):
        raise ConfigError("affinity", f"must be high, low or auto, got {req.affinity!r}")

"""Scoring a deployment: simulated strict SLO attainment, and goodput by bisection.

*Strict attainment* is the share of all requests that finish with TTFT ≤ the TTFT SLO
**and** TPOT ≤ the TPOT SLO (a request that never runs, or is still unfinished when the
run ends, misses). Runs last until every request that could still meet its SLOs has
finished, so nothing is left undecided.

*Goodput* is the highest rate at which attainment ≥ the target. Rates live on one
geometric grid shared by every candidate (per GPU: ``top · f^-k``), so goodputs are
compared exactly and bisection is over grid indices. Three caps are part of the score:
no rate above the deployment's fluid capacity (the rate its phases could sustain with
no SLO at all: above it queues grow without bound, and only a finite run could hide
that), nor above either phase's goodput measured alone (prefill alone, TTFT only;
decode alone, TPOT only). Each cap only removes rates the full system could not
sustain anyway, and they let the search skip candidates without simulating them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from disagg.errors import ConfigError
from disagg.planner.presets import PlanWorkload
from disagg.planner.space import Deployment, PhaseConfig
from disagg.sim.cluster import ClusterSpec
from disagg.sim.latency import (
    KV_TRANSFER_LATENCY_S,
    AnalyticLatency,
    LatencyModel,
    LatencyProfile,
)
from disagg.sim.presets import GpuSpec, ModelShape
from disagg.sim.simulator import Simulator

# A phase that is "free" in a phase-alone run: no time, no memory limit.
_NO_TIME_S = 1e-9
_NO_LIMIT_TOKENS = 1 << 40
_BIG_BANDWIDTH = 1e18
COLOCATED_POLICY = {"per-stage-vtc": "vtc", "two-stage-vtc": "vtc"}


@dataclass(frozen=True)
class SLOTarget:
    ttft: float
    tpot: float
    attainment: float


# -- latency of an instance, as the planner serves it --------------------------------


class InstanceLatency:
    """An instance's :class:`LatencyModel` with pipeline parallelism made honest.

    The latency models give a pp-stage instance's batch time as T/pp (a full pipeline's
    throughput; docs/latency-model.md). Prefill keeps that as the service time, and the
    first token's extra (pp-1)·T/pp of latency is added to TTFT when scoring
    (:func:`attainment`). Decode serves its batch as pp micro-batches that each pass
    every stage, so one decode step of the whole batch takes the whole model's time for
    one micro-batch: ``T_pp1(ceil(B/pp))``, not ``T_pp1(B)/pp``.
    """

    __slots__ = ("_base", "_whole", "kv_bytes_per_token", "kv_capacity_tokens", "pp", "tp")

    def __init__(self, base: LatencyModel, whole_model: LatencyModel, capacity: int):
        self._base = base  # at (tp, pp): T/pp
        self._whole = whole_model  # at (tp, 1): T
        self.tp, self.pp = base.tp, base.pp
        self.kv_bytes_per_token = base.kv_bytes_per_token
        self.kv_capacity_tokens = capacity

    def prefill_time(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> float:
        return self._base.prefill_time(num_tokens, sum_sq_tokens, batch_size)

    def decode_time(self, batch_size: int, total_context: int) -> float:
        if self.pp == 1:
            return self._base.decode_time(batch_size, total_context)
        micro = -(-batch_size // self.pp)
        return self._whole.decode_time(micro, total_context * micro // batch_size)


class _Free:
    """A phase that costs nothing: what the other phase sees in a phase-alone run."""

    tp = pp = 1
    kv_bytes_per_token = 1
    kv_capacity_tokens = _NO_LIMIT_TOKENS

    def prefill_time(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> float:
        return _NO_TIME_S

    def decode_time(self, batch_size: int, total_context: int) -> float:
        return _NO_TIME_S


@dataclass
class LatencySource:
    """Builds instance latencies from a fitted profile or the roofline, and says which
    layouts fit."""

    model: ModelShape
    gpu: GpuSpec
    profile: LatencyProfile | None = None
    _cache: dict[PhaseConfig, InstanceLatency | str] = field(default_factory=dict)

    @property
    def handoff_s(self) -> float:
        """Fixed seconds of a KV hand-off: the profile's served ``handoff_s`` when it
        has one, else the transfer latency assumed for GPUs."""
        measured = self.profile.handoff_s if self.profile is not None else None
        return KV_TRANSFER_LATENCY_S if measured is None else measured

    @property
    def ttft_overhead_s(self) -> float:
        """Fixed messaging seconds in every TTFT (the profile's, measured in service)."""
        measured = self.profile.ttft_overhead_s if self.profile is not None else None
        return measured or 0.0

    @property
    def prefill_gap_s(self) -> float:
        """A served prefill node's turnaround between batches (the profile's, or 0)."""
        measured = self.profile.prefill_gap_s if self.profile is not None else None
        return measured or 0.0

    @property
    def prefill_jitter(self) -> float:
        """Spread of served prefill batch times around the fit (the profile's, or 0)."""
        measured = self.profile.prefill_jitter if self.profile is not None else None
        return measured or 0.0

    def instance(self, config: PhaseConfig) -> InstanceLatency | str:
        """The latency of one instance, or a sentence saying why there is none."""
        if config not in self._cache:
            self._cache[config] = self._build(config)
        return self._cache[config]

    def _build(self, c: PhaseConfig) -> InstanceLatency | str:
        if self.profile is not None:
            try:
                base = self.profile.model(c.tp, c.pp)
                whole = self.profile.model(c.tp, 1) if c.pp > 1 else base
            except ConfigError as exc:
                return f"the latency profile has no {c}: {exc.reason}"
            return InstanceLatency(base, whole, base.kv_capacity_tokens)
        analytic = AnalyticLatency(self.model, self.gpu, c.tp, c.pp)
        if not analytic.fits:
            return analytic.why
        whole = AnalyticLatency(self.model, self.gpu, c.tp, 1) if c.pp > 1 else analytic
        return InstanceLatency(analytic, whole, analytic.kv_capacity_tokens)


# -- fluid capacity -------------------------------------------------------------------


def prefill_capacity(lat: LatencyModel, w: PlanWorkload, max_batch_tokens: int) -> float:
    """Requests/s one instance's prefill sustains with full batches of the mean prompt
    (Σl² at the workload's mean square): no SLO, no queueing. Larger batches amortise
    the per-step cost, so the fullest batch the token budget allows is the fastest."""
    k = max(1, int(max_batch_tokens // max(w.mean_prompt, 1)))
    t = lat.prefill_time(round(k * w.mean_prompt), round(k * w.mean_sq_prompt), k)
    return k / t


def decode_capacity(lat: LatencyModel, w: PlanWorkload, max_batch_size: int) -> float:
    """Requests/s one instance's decode sustains: the largest batch memory allows when
    every request holds only its prompt, each step at that context."""
    b = max(1, min(max_batch_size, int(lat.kv_capacity_tokens // max(w.mean_prompt, 1))))
    t = lat.decode_time(b, round(b * w.mean_prompt))
    return b / t / max(w.mean_output - 1, 1)


# -- one simulation -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    attainment: float
    ttft_p90: float | None
    tpot_p90: float | None


def _p90(values: list[float]) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = 0.9 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def attainment(
    result,
    n: int,
    slo: SLOTarget,
    prefill_pp: int,
    check: str = "both",
    ttft_overhead_s: float = 0.0,
) -> Outcome:
    """Strict attainment over all ``n`` requests; ``check`` ``ttft`` or ``tpot`` judges
    one SLO only (the phase-alone runs). TTFT includes the pipeline latency that the
    T/pp service time leaves out: (pp-1) more times the request's prefill batch time,
    and ``ttft_overhead_s`` of messaging. (A fixed delay before the prefill queue
    shifts every arrival alike, so it changes nothing else in the run.)"""
    met = 0
    ttfts, tpots = [], []
    extra = prefill_pp - 1
    for r in result.requests:
        if r.finish_time is None:
            continue
        ttft = r.first_token_time - r.arrival_time + ttft_overhead_s
        if extra:
            ttft += extra * (r.first_token_time - r.prefill_start)
        tpot = r.tpot
        ttfts.append(ttft)
        tpots.append(tpot)
        ok_ttft = ttft <= slo.ttft or check == "tpot"
        ok_tpot = tpot <= slo.tpot or check == "ttft"
        met += ok_ttft and ok_tpot
    return Outcome(met / n, _p90(ttfts), _p90(tpots))


@dataclass
class Evaluator:
    """Runs the simulator for a deployment at a rate, and caches each result."""

    workload: PlanWorkload
    latency: LatencySource
    slo: SLOTarget
    policy: str
    intra_bandwidth: float  # bytes/s, one GPU's link inside a node
    inter_bandwidth: float  # bytes/s, one GPU's network share
    max_batch_tokens: int = 8192
    max_batch_size: int = 256
    simulations: int = 0
    _cache: dict = field(default_factory=dict)

    @property
    def drain(self) -> float:
        """Past the last arrival, the time a request meeting both SLOs may still need."""
        return self.slo.ttft + self.slo.tpot * max(self.workload.output_lens) + 1.0

    def transfer_bandwidth(self, d: Deployment) -> float:
        """Each GPU of the smaller instance moves its shard over its own link."""
        assert d.decode is not None
        link = self.intra_bandwidth if d.affinity == "low" else self.inter_bandwidth
        return link * min(d.prefill.gpus, d.decode.gpus)

    def run(self, d: Deployment, rate: float, check: str = "both") -> Outcome:
        """Attainment of ``d``'s simulated copy at ``rate`` req/s for that copy.
        ``check`` ``ttft``: prefill alone (decode free); ``tpot``: decode alone."""
        key = (d, rate, check)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        self.simulations += 1
        w = self.workload.at_rate(rate, self.drain)
        prefill = self.latency.instance(d.prefill)
        assert not isinstance(prefill, str)
        if d.decode is None:
            spec = ClusterSpec(
                kind="colocated",
                instances=d.n_prefill,
                max_batch_tokens=self.max_batch_tokens,
                max_batch_size=self.max_batch_size,
            )
            policy = COLOCATED_POLICY.get(self.policy, self.policy)
            sim = Simulator(w, spec, policy=policy, latency=prefill)
        else:
            decode = self.latency.instance(d.decode)
            assert not isinstance(decode, str)
            bandwidth, latency_s = self.transfer_bandwidth(d), self.latency.handoff_s
            gap, jitter = self.latency.prefill_gap_s, self.latency.prefill_jitter
            if check == "ttft":
                decode, bandwidth, latency_s = _Free(), _BIG_BANDWIDTH, 0.0
            elif check == "tpot":
                prefill, bandwidth, latency_s = _Free(), _BIG_BANDWIDTH, 0.0
                gap = jitter = 0.0
            spec = ClusterSpec(
                kind="disagg",
                prefill=d.n_prefill,
                decode=d.n_decode,
                max_batch_tokens=self.max_batch_tokens,
                max_batch_size=self.max_batch_size,
                transfer_bandwidth=bandwidth,
                transfer_latency=latency_s,
                prefill_gap=gap,
                prefill_jitter=jitter,
            )
            sim = Simulator(w, spec, policy=self.policy, latency=prefill, decode_latency=decode)
        pp = 1 if check == "tpot" else d.prefill.pp
        overhead = 0.0 if check == "tpot" else self.latency.ttft_overhead_s
        out = attainment(sim.run(), len(self.workload), self.slo, pp, check, overhead)
        self._cache[key] = out
        return out

    def meets(self, d: Deployment, rate: float, check: str = "both") -> bool:
        return self.run(d, rate, check).attainment >= self.slo.attainment


# -- the rate grid --------------------------------------------------------------------


@dataclass(frozen=True)
class RateGrid:
    """Rates ``top · step^-k`` for k = 0..size-1 (k = 0 the highest)."""

    top: float
    step: float = 1.02
    span: float = 1e4  # the lowest rate is top / span

    @property
    def size(self) -> int:
        return math.ceil(math.log(self.span) / math.log(self.step)) + 1

    def rate(self, k: int) -> float:
        return self.top * self.step**-k

    def index_at_most(self, value: float) -> int:
        """The smallest k whose rate is <= value (size when none is)."""
        if value <= 0:
            return self.size
        k = max(0, math.ceil(math.log(self.top / value) / math.log(self.step) - 1e-9))
        while k < self.size and self.rate(k) > value * (1 + 1e-12):
            k += 1
        return k


def lowest_feasible(feasible, lo: int, hi: int) -> int | None:
    """The smallest k in [lo, hi] with ``feasible(k)``, assuming feasibility only grows
    with k (lower rates); None when even ``hi`` fails. Checks ``hi`` first."""
    if lo > hi or not feasible(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi

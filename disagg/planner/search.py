"""Finding the deployment with the highest goodput per GPU: branch and bound.

Every candidate starts with a cheap bound, its fluid capacity per GPU (closed form).
Candidates are taken best bound first. A candidate's first visit replaces its bound by
a tighter one, the goodput of each of its phases measured alone (prefill with free
decode, TTFT only; decode with free prefill, TPOT only; cached per phase config and
instance count, since many candidates share them), and puts it back. Its second visit
simulates the whole deployment, but only asks whether it beats the best found so far
(one run at the grid rate just above the incumbent); if it does, bisection finds its
goodput. The search stops when the best remaining bound cannot beat the incumbent.

Both bounds are caps of the score itself (goodput.py), so no candidate left unvisited
can score higher than the one returned: the result equals an exhaustive search's
whenever attainment falls as the rate rises (bisection assumes that too), which the
tests check against :func:`exhaustive` on small spaces.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

from disagg.planner.goodput import (
    Evaluator,
    Outcome,
    RateGrid,
    decode_capacity,
    lowest_feasible,
    prefill_capacity,
)
from disagg.planner.space import Deployment, PhaseConfig


@dataclass(frozen=True)
class Scored:
    deployment: Deployment
    index: int  # grid index of its goodput
    per_gpu_goodput: float  # req/s per GPU
    outcome: Outcome  # at that rate


@dataclass
class SearchStats:
    candidates: int = 0
    simulated: int = 0  # candidates simulated whole
    pruned_by_bound: int = 0


@dataclass
class Scorer:
    """The score of a deployment (goodput per GPU on the grid) and its bounds."""

    evaluator: Evaluator
    grid: RateGrid
    _phase: dict = field(default_factory=dict)
    _capacity: dict = field(default_factory=dict)

    # -- bounds ---------------------------------------------------------------------

    def capacity(self, d: Deployment) -> float:
        """Fluid capacity of the simulated copy, req/s."""
        cached = self._capacity.get(d)
        if cached is None:
            cached = self._capacity[d] = self._fluid(d)
        return cached

    def _fluid(self, d: Deployment) -> float:
        ev = self.evaluator
        p = ev.latency.instance(d.prefill)
        mu_p = prefill_capacity(p, ev.workload, ev.max_batch_tokens)
        if d.decode is None:
            mu_d = decode_capacity(p, ev.workload, ev.max_batch_size)
            return d.n_prefill / (1 / mu_p + 1 / mu_d)
        q = ev.latency.instance(d.decode)
        mu_d = decode_capacity(q, ev.workload, ev.max_batch_size)
        return min(d.n_prefill * mu_p, d.n_decode * mu_d)

    def phase_meets(self, config: PhaseConfig, n: int, check: str, rate: float) -> bool:
        """Whether ``n`` instances of ``config`` running one phase alone meet that
        phase's SLO at ``rate``. Results are kept per (config, n, phase) as the highest
        rate known to pass and the lowest known to fail, so a query between earlier
        ones is answered without a run (attainment falls as the rate rises)."""
        known = self._phase.setdefault((config, n, check), [0.0, math.inf])
        if rate <= known[0]:
            return True
        if rate >= known[1]:
            return False
        if check == "ttft":
            d = Deployment(config, n, config, 1)
        else:
            d = Deployment(config, 1, config, n)
        ok = self.evaluator.meets(d, rate, check)
        if ok:
            known[0] = rate
        else:
            known[1] = rate
        return ok

    # -- the score --------------------------------------------------------------------

    def serves(self, d: Deployment, rate: float) -> bool:
        """Whether ``d``'s simulated copy serves ``rate`` req/s: within its fluid
        capacity, each phase meeting its own SLO alone, and the whole meeting both."""
        if rate > self.capacity(d) * (1 + 1e-12):
            return False
        decode = d.decode or d.prefill
        n_d = d.n_decode if d.decode is not None else d.n_prefill
        return (
            self.phase_meets(d.prefill, d.n_prefill, "ttft", rate)
            and self.phase_meets(decode, n_d, "tpot", rate)
            and self.evaluator.meets(d, rate)
        )

    def feasible(self, d: Deployment, k: int) -> bool:
        """Whether ``d`` scores at least grid rate ``k`` (per GPU)."""
        return self.serves(d, self.grid.rate(k) * d.unit_gpus)

    def score(self, d: Deployment, lo: int, hi: int | None = None) -> Scored | None:
        """``d``'s goodput if its grid index is in [lo, hi] (default: anywhere)."""
        hi = self.grid.size - 1 if hi is None else hi
        k = lowest_feasible(lambda k: self.feasible(d, k), lo, hi)
        if k is None:
            return None
        rate = self.grid.rate(k)
        return Scored(d, k, rate, self.evaluator.run(d, rate * d.unit_gpus))


def top_rate(scorer: Scorer, deployments: list[Deployment]) -> float:
    """The grid's top: the highest fluid capacity per GPU of any candidate."""
    return max(scorer.capacity(d) / d.unit_gpus for d in deployments)


def branch_and_bound(
    scorer: Scorer, deployments: list[Deployment], stats: SearchStats | None = None
) -> Scored | None:
    stats = stats if stats is not None else SearchStats()
    stats.candidates += len(deployments)
    order = itertools.count()
    heap = [(-scorer.capacity(d) / d.unit_gpus, next(order), d) for d in deployments]
    heapq.heapify(heap)
    best: Scored | None = None
    best_k = scorer.grid.size  # no incumbent: every index beats it
    while heap:
        neg_bound, _, d = heapq.heappop(heap)
        lo = scorer.grid.index_at_most(-neg_bound)
        if lo >= best_k:
            stats.pruned_by_bound += len(heap) + 1
            break
        stats.simulated += 1
        found = scorer.score(d, lo, best_k - 1)
        if found is not None:
            best, best_k = found, found.index
    return best


def exhaustive(scorer: Scorer, deployments: list[Deployment]) -> Scored | None:
    """Every candidate scored in full: the reference the search must match."""
    best: Scored | None = None
    for d in deployments:
        found = scorer.score(d, 0)
        if found is not None and (best is None or found.index < best.index):
            best = found
    return best

"""The bench logic of ``bench.sim_vs_served`` that the comparison rests on: the
per-request prediction is the run the planner's Evaluator scores, served results are
scored as the planner scores, and the arrivals are the simulator's."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.sim_vs_served import (
    DEFAULT_PROFILE,
    arrival_times,
    gaps,
    knee,
    predicted_requests,
    served_outcome,
)
from disagg.planner.goodput import Evaluator, LatencySource, SLOTarget
from disagg.planner.presets import load_plan_workload, resolve_model
from disagg.planner.space import Deployment, PhaseConfig
from disagg.sim.latency import load_profile
from disagg.sim.presets import gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    workload = load_plan_workload("chatbot-like", 60, seed=3)
    latency = LatencySource(
        resolve_model("opt-13b"), gpu("a100-80g"), load_profile(ROOT / DEFAULT_PROFILE)
    )
    return Evaluator(workload, latency, SLOTarget(0.25, 0.1, 0.9), "two-stage-vtc", 25e9, 25e9)


@pytest.mark.parametrize("rate", [4.0, 20.0])
def test_per_request_prediction_is_the_evaluators_run(evaluator: Evaluator, rate: float):
    d = Deployment(PhaseConfig(1, 1), 1, PhaseConfig(1, 1), 2)
    mine = predicted_requests(evaluator, d, rate)
    assert len(mine) == len(evaluator.workload)
    assert served_outcome(mine, evaluator.slo) == evaluator.run(d, rate)


def test_arrivals_are_the_simulators(evaluator: Evaluator):
    w = evaluator.workload.at_rate(7.0, evaluator.drain)
    assert arrival_times(evaluator.workload.unit_gaps, 7.0) == [a.time for a in w.arrivals]


def test_served_outcome_is_strict_and_counts_unfinished_as_missed():
    slo = SLOTarget(0.25, 0.1, 0.9)
    inf = float("inf")
    out = served_outcome([(0.1, 0.05), (0.3, 0.05), (0.1, 0.2), (inf, inf)], slo)
    assert out.attainment == 0.25


def test_knee_is_the_highest_rate_that_meets():
    assert knee(lambda r: r <= 7.2, 0.5, 40.0, 0.5) == 7.0
    assert knee(lambda r: r in (3.0, 9.0), 0.5, 40.0, 0.5) == 9.0  # not monotonic: the top
    assert knee(lambda r: False, 0.5, 40.0, 0.5) == 0.5


def test_gaps_are_signed_request_by_request():
    median, p90, largest = gaps([1.0, 2.0, 3.0], [1.5, 2.0, 2.0])
    assert median == 0.0 and largest == 1.0 and 0.0 < p90 <= 1.0

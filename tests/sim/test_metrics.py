"""The simulator's figures on hand-built results: percentiles, Jain's index, the VTC
paper's service difference, the backlogged-pair difference, SLO attainment."""

from __future__ import annotations

import random

import numpy as np
import pytest

from disagg.scheduling import LinearCost
from disagg.sim.cluster import ClusterSpec, ServiceLog
from disagg.sim.metrics import (
    MAX_PAIR_CLIENTS,
    SLO,
    TICK_S,
    client_service,
    jain_index,
    max_backlogged_difference,
    percentile,
    service_difference,
    service_timeline,
    slo_attainment,
    summarize,
)
from disagg.sim.request import SimRequest
from disagg.sim.simulator import SimResult


def result(
    duration: float,
    clients: list[str],
    *,
    requests: list[SimRequest] = (),
    rejected: list[SimRequest] = (),
    events: list[tuple[float, str, float]] = (),
    backlog: list[tuple[float, str, int]] = (),
    weights: dict[str, float] | None = None,
) -> SimResult:
    weights = {c: 1.0 for c in clients} | (weights or {})
    log = ServiceLog(LinearCost(), weights)
    log.events.extend(events)
    log.backlog.extend(backlog)
    return SimResult(
        "vtc", ClusterSpec(), duration, list(requests), list(rejected), log, weights, clients
    )


def request(
    client: str = "a",
    arrival: float = 0.0,
    prompt: int = 10,
    output: int = 10,
    *,
    first: float | None = None,
    finish: float | None = None,
    produced: int | None = None,
) -> SimRequest:
    r = SimRequest(0, client, arrival, prompt, output)
    r.first_token_time = first
    r.finish_time = finish
    r.produced = produced if produced is not None else (output if finish is not None else 0)
    return r


# -- percentile, Jain ----------------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([4, 1, 3, 2], 50) == 2.5  # unsorted input
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile(list(range(1, 11)), 90) == pytest.approx(9.1)
    rng = random.Random(0)
    for _ in range(50):
        xs = [rng.expovariate(1.0) for _ in range(rng.randint(1, 40))]
        q = rng.uniform(0, 100)
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_jain_index_is_one_for_equal_shares_and_one_over_n_for_one_winner():
    assert jain_index([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain_index([0.0, 9.0, 0.0, 0.0]) == pytest.approx(1 / 4)
    assert jain_index([1.0, 2.0]) == pytest.approx(9 / 10)
    assert jain_index([]) is None
    assert jain_index([0.0, 0.0]) is None


# -- service difference (the VTC paper's) --------------------------------------------


def test_service_difference_per_tick_is_the_smaller_of_the_gap_and_the_unmet_demand():
    # Three 60-s ticks, h = n_in + 2 n_out.
    requests = [
        request("a", 10, 200, 400),  # demand 1000 in tick 0
        request("b", 20, 100, 100),  # demand 300 in tick 0
        request("b", 70, 100, 400),  # demand 900 in tick 1
    ]
    rejected = [request("b", 130, 200, 400)]  # demand 1000 in tick 2: refused still counts
    events = [
        (5.0, "a", 600.0),
        (30.0, "b", 300.0),
        (61.0, "a", 1200.0),
        (150.0, "a", 600.0),
        (180.0, "b", 200.0),  # at the very end: the last tick
    ]
    r = result(180.0, ["a", "b"], requests=requests, rejected=rejected, events=events)
    # tick 0: a leads (0); b got all it asked for: min(300, |300 - 300|) = 0
    # tick 1: b is 1200 behind with 900 unmet: 900
    # tick 2: b is 400 behind with 800 unmet: 400
    worst, mean = service_difference(r)
    assert worst == pytest.approx(900 / TICK_S)
    assert mean == pytest.approx((0 + 900 + 400) / 3 / TICK_S)


def test_service_difference_divides_demand_by_the_weight():
    # a (weight 2) asks for 1000 raw = 500 weighted and gets 100 weighted; b got 400.
    requests = [request("a", 1, 200, 400), request("b", 1, 100, 100)]
    events = [(2.0, "a", 100.0), (3.0, "b", 400.0)]
    r = result(60.0, ["a", "b"], requests=requests, events=events, weights={"a": 2.0})
    assert service_difference(r) == pytest.approx((300 / TICK_S, 300 / TICK_S))


def test_service_difference_of_a_client_that_asked_for_nothing_is_zero():
    r = result(60.0, ["a", "b"], requests=[request("a", 1, 10, 10)], events=[(2.0, "a", 30.0)])
    assert service_difference(r) == (0.0, 0.0)


# -- the backlogged-pair difference --------------------------------------------------


def test_backlogged_difference_is_the_range_of_the_gap_while_both_wait():
    backlog = [(0.0, "a", +1), (0.0, "b", +1)]
    events = [(1.0, "a", 100.0), (2.0, "b", 30.0), (3.0, "a", 50.0), (4.0, "b", 200.0)]
    # a - b: 0, 100, 70, 120, -80: the widest swing is 200.
    assert max_backlogged_difference(result(10, ["a", "b"], events=events, backlog=backlog)) == 200


def test_backlogged_difference_counts_only_service_while_both_are_pending():
    backlog = [(0.0, "a", +1), (5.0, "b", +1), (7.0, "b", -1), (9.0, "b", +1)]
    events = [
        (1.0, "a", 1000.0),  # b not pending yet: no pair
        (6.0, "a", 10.0),  # pair (a, b): 10
        (8.0, "a", 500.0),  # b left at 7: no pair
        (10.0, "b", 20.0),  # a new span from b's return: 20
    ]
    r = result(20, ["a", "b"], events=events, backlog=backlog)
    assert max_backlogged_difference(r) == 20


def test_backlogged_difference_counts_a_pending_clients_own_service_at_its_entry():
    # Backlog changes go first at a tie, so service at the entry instant is inside.
    backlog = [(0.0, "a", +1), (2.0, "b", +1)]
    events = [(2.0, "a", 40.0)]
    assert max_backlogged_difference(result(5, ["a", "b"], events=events, backlog=backlog)) == 40


def test_service_delivered_at_one_instant_is_one_change():
    # One (macro-)step serves both clients at t = 1: their gap never moves, whatever
    # order the two charges were logged in.
    backlog = [(0.0, "a", +1), (0.0, "b", +1)]
    for events in (
        [(1.0, "a", 500.0), (1.0, "b", 500.0)],
        [(1.0, "b", 500.0), (1.0, "a", 500.0)],
    ):
        r = result(5, ["a", "b"], events=events, backlog=backlog)
        assert max_backlogged_difference(r) == 0
    # a - b goes 0 -> 200 (at t = 1, never 500) -> -100: the range is 300.
    events = [(1.0, "a", 500.0), (1.0, "b", 300.0), (2.0, "b", 300.0)]
    r = result(5, ["a", "b"], events=events, backlog=backlog)
    assert max_backlogged_difference(r) == 300


def test_backlogged_difference_gives_up_past_the_pairwise_limit():
    clients = [f"c{i}" for i in range(MAX_PAIR_CLIENTS + 1)]
    assert max_backlogged_difference(result(5, clients)) is None
    assert max_backlogged_difference(result(5, clients[:-1])) == 0


# -- SLO attainment ------------------------------------------------------------------


def test_slo_attainment_judges_finished_requests_on_both_ttft_and_tpot():
    slo = SLO(ttft=1.0, tpot=0.1)
    requests = [
        request(arrival=0, output=11, first=0.5, finish=1.5),  # ttft 0.5, tpot 0.1: met
        request(arrival=0, output=11, first=1.5, finish=2.0),  # ttft 1.5: missed
        request(arrival=0, output=11, first=0.2, finish=2.2),  # tpot 0.2: missed
        request(arrival=0, output=1, first=0.9, finish=0.9),  # one token: tpot 0, met
    ]
    assert slo_attainment(result(100, ["a"], requests=requests), slo) == pytest.approx(2 / 4)


def test_unfinished_requests_count_as_misses_only_once_they_can_no_longer_meet_the_slo():
    slo = SLO(ttft=1.0, tpot=0.1)
    end = 100.0
    met = request(arrival=0, output=2, first=0.5, finish=0.6)
    open_fates = [
        request(arrival=99.5, output=10),  # waiting 0.5 s: may still start in time
        request(arrival=99.0, output=100, first=99.5, produced=5),  # 0.5 s of 9.9 s budget
    ]
    lost = [
        request(arrival=97.0, output=10),  # waited 3 s without a token
        request(arrival=90.0, output=100, first=92.0, produced=50),  # ttft 2 s
        request(arrival=80.0, output=11, first=80.5, produced=5),  # 19.5 s > 1 s budget
    ]
    r = result(end, ["a"], requests=[met, *open_fates])
    assert slo_attainment(r, slo) == 1.0  # the open ones are left out
    r = result(end, ["a"], requests=[met, *open_fates, *lost])
    assert slo_attainment(r, slo) == pytest.approx(1 / 4)
    assert slo_attainment(result(end, ["a"], requests=open_fates), slo) is None


# -- summaries -----------------------------------------------------------------------


def test_summary_figures_on_a_hand_built_result():
    requests = [
        request("a", 0.0, 10, 4, first=1.0, finish=4.0),  # ttft 1, tpot 1
        request("a", 0.0, 10, 4, first=3.0, finish=4.5),  # ttft 3, tpot 0.5
        request("b", 1.0, 10, 10, first=2.0, produced=6),  # unfinished
    ]
    rejected = [request("b", 2.0, 10, 10)]
    events = [(0.0, "a", 20.0), (4.0, "a", 16.0), (1.0, "b", 10.0), (9.0, "b", 12.0)]
    backlog = [(0.0, "a", +1), (0.0, "a", +1), (0.0, "a", -1), (0.0, "a", -1)]
    r = result(
        10.0,
        ["a", "b", "idle"],
        requests=requests,
        rejected=rejected,
        events=events,
        backlog=backlog,
    )
    s = summarize(r, SLO(ttft=2.0, tpot=1.0))
    assert s["clients"]["a"] == {
        "service": 36.0,
        "requests": 2,
        "arrived": 2,
        "rejected": 0,
        "weight": 1.0,
        "ttft_p50": 2.0,
        "ttft_p90": pytest.approx(2.8),
        "tpot_p50": 0.75,
        "tpot_p90": pytest.approx(0.95),
    }
    assert s["clients"]["b"]["requests"] == 0 and s["clients"]["b"]["rejected"] == 1
    assert s["clients"]["b"]["ttft_p50"] == 1.0 and s["clients"]["b"]["tpot_p50"] is None
    assert s["clients"]["idle"]["service"] == 0.0 and s["clients"]["idle"]["ttft_p50"] is None
    assert (s["finished"], s["unfinished"], s["rejected"]) == (2, 1, 1)
    assert s["throughput_tokens_per_s"] == pytest.approx((4 + 4 + 6) / 10)
    assert s["throughput_requests_per_s"] == pytest.approx(0.2)
    # b is unfinished with ttft 1 s and 6 tokens in 8 s against a 9-s budget: still open.
    assert s["slo_attainment"] == pytest.approx(1 / 2)
    assert s["jain_index"] == pytest.approx(jain_index([36.0, 22.0, 0.0]))
    assert client_service(r) == {"a": 36.0, "b": 22.0, "idle": 0.0}


def test_service_timeline_is_cumulative_per_step():
    events = [(0.5, "a", 1.0), (1.5, "a", 2.0), (1.7, "b", 5.0), (2.9, "a", 4.0)]
    times, cumulative = service_timeline(result(3.0, ["a", "b"], events=events), step=1.0)
    assert times == [1.0, 2.0, 3.0]
    assert cumulative == {"a": [1.0, 3.0, 7.0], "b": [0.0, 5.0, 5.0]}

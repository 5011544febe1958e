"""What a simulation measured: per request, per client, and the fairness figures of the
VTC paper, all over the window [0, duration]."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from disagg.sim.simulator import SimResult

TICK_S = 60.0  # the VTC paper's service-difference window
MAX_PAIR_CLIENTS = 32  # pairwise backlogged differences are O(clients²) per event


@dataclass(frozen=True)
class SLO:
    ttft: float  # seconds
    tpot: float  # seconds


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def slo_attainment(result: SimResult, slo: SLO) -> float | None:
    """Share of requests meeting *both* SLOs. A finished request is judged on its TTFT
    and TPOT; an unfinished one counts as a miss once it can no longer meet them (its
    wait or its decode so far already exceeds the budget) and is left out while its
    fate is still open at the end of the window."""
    met = judged = 0
    end = result.duration
    for r in result.requests:
        if r.finish_time is not None:
            judged += 1
            met += r.ttft <= slo.ttft and r.tpot <= slo.tpot
        elif r.first_token_time is None:
            judged += end - r.arrival_time > slo.ttft
        elif r.ttft > slo.ttft or end - r.first_token_time > slo.tpot * max(r.output_len - 1, 1):
            judged += 1
    return met / judged if judged else None


def client_service(result: SimResult) -> dict[str, float]:
    total: dict[str, float] = dict.fromkeys(result.client_ids, 0.0)
    for _, client, amount in result.log.events:
        total[client] = total.get(client, 0.0) + amount
    return total


def service_difference(result: SimResult) -> tuple[float, float]:
    """The VTC paper's metric: per 60-s tick and client, ``min(max_j S_j - S_i,
    |demand_i - S_i|)`` in weighted service per second; the tick's value is the max
    over clients; returns (max, mean) over ticks."""
    ticks = max(1, math.ceil(result.duration / TICK_S))
    clients = result.client_ids
    service = [dict.fromkeys(clients, 0.0) for _ in range(ticks)]
    demand = [dict.fromkeys(clients, 0.0) for _ in range(ticks)]
    for t, client, amount in result.log.events:
        service[min(int(t // TICK_S), ticks - 1)][client] += amount
    cost = result.metric_cost
    for r in result.requests + result.rejected:
        w = result.weights.get(r.client_id, 1.0)
        demand[min(int(r.arrival_time // TICK_S), ticks - 1)][r.client_id] += (
            cost(r.prompt_len, r.output_len) / w
        )
    per_tick = []
    for s, d in zip(service, demand, strict=True):
        top = max(s.values())
        per_tick.append(max(min(top - s[c], abs(d[c] - s[c])) for c in clients) / TICK_S)
    return max(per_tick), sum(per_tick) / len(per_tick)


def max_backlogged_difference(result: SimResult) -> float | None:
    """The largest |(S_i - S_j) change| over any interval during which clients i and j
    were both backlogged (pending) throughout: what VTC's fairness bound limits.
    None when there are too many clients to compare pairwise."""
    clients = result.client_ids
    if len(clients) > MAX_PAIR_CLIENTS:
        return None
    # Merge service and backlog events in time order; backlog changes first at a tie,
    # so a client is counted backlogged for service delivered at its entry time.
    # Service delivered at one instant (one step, or one macro-step, charging several
    # clients) is one change: the differences are read after all of it, not between
    # two clients' shares, which would depend on the order they were logged in.
    stream = [(t, 0, c, d) for t, c, d in result.log.backlog] + [
        (t, 1, c, a) for t, c, a in result.log.events
    ]
    stream.sort(key=lambda e: (e[0], e[1]))
    stream.append((math.inf, 0, "", 0))  # flushes the last instant's service
    served = dict.fromkeys(clients, 0.0)
    pending = dict.fromkeys(clients, 0)
    # (i, j) -> (min, max) of S_i - S_j since both became backlogged
    ranges: dict[tuple[str, str], list[float]] = {}
    best = 0.0
    served_now: set[str] = set()  # backlogged clients served at the current instant
    instant = -math.inf
    for t, kind, client, value in stream:
        if t != instant or kind == 0:
            for pair, span in ranges.items():
                if pair[0] in served_now or pair[1] in served_now:
                    d = served[pair[0]] - served[pair[1]]
                    span[0] = min(span[0], d)
                    span[1] = max(span[1], d)
                    best = max(best, span[1] - span[0])
            served_now.clear()
            instant = t
        if t == math.inf:
            break
        if kind == 0:
            was = pending[client] > 0
            pending[client] += value
            now = pending[client] > 0
            if now and not was:
                for other in clients:
                    if other != client and pending[other] > 0:
                        pair = (client, other) if client < other else (other, client)
                        d = served[pair[0]] - served[pair[1]]
                        ranges[pair] = [d, d]
            elif was and not now:
                for pair in [p for p in ranges if client in p]:
                    del ranges[pair]
            continue
        served[client] += value
        if pending[client] > 0:
            served_now.add(client)
    return best


def jain_index(values: list[float]) -> float | None:
    if not values or not any(values):
        return None
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def summarize(result: SimResult, slo: SLO | None = None) -> dict:
    """The figures ``disagg simulate --json`` prints."""
    service = client_service(result)
    per_client = {}
    for c in result.client_ids:
        mine = [r for r in result.requests if r.client_id == c]
        ttfts = [r.ttft for r in mine if r.ttft is not None]
        tpots = [r.tpot for r in mine if r.finish_time is not None]
        per_client[c] = {
            "service": service.get(c, 0.0),
            "requests": sum(r.finish_time is not None for r in mine),
            "arrived": len(mine),
            "rejected": sum(r.client_id == c for r in result.rejected),
            "weight": result.weights.get(c, 1.0),
            "ttft_p50": percentile(ttfts, 50),
            "ttft_p90": percentile(ttfts, 90),
            "tpot_p50": percentile(tpots, 50),
            "tpot_p90": percentile(tpots, 90),
        }
    max_diff, avg_diff = service_difference(result)
    output_tokens = sum(r.produced for r in result.requests)
    finished = [r for r in result.requests if r.finish_time is not None]
    return {
        "policy": result.policy,
        "cluster": result.cluster.kind,
        "duration": result.duration,
        "clients": per_client,
        "max_service_diff": max_diff,
        "avg_service_diff": avg_diff,
        "max_backlogged_service_diff": max_backlogged_difference(result),
        "jain_index": jain_index([service.get(c, 0.0) for c in result.client_ids]),
        "throughput_tokens_per_s": output_tokens / result.duration,
        "throughput_requests_per_s": len(finished) / result.duration,
        "finished": len(finished),
        "unfinished": len(result.requests) - len(finished),
        "rejected": len(result.rejected),
        "preemptions": sum(r.num_preemptions for r in result.requests),
        "slo": None if slo is None else {"ttft": slo.ttft, "tpot": slo.tpot},
        "slo_attainment": None if slo is None else slo_attainment(result, slo),
        "ttft_p90": percentile([r.ttft for r in finished], 90),
        "tpot_p90": percentile([r.tpot for r in finished], 90),
    }


def service_timeline(
    result: SimResult, step: float = 1.0
) -> tuple[list[float], dict[str, list[float]]]:
    """Cumulative weighted service per client sampled every ``step`` seconds."""
    n = max(1, math.ceil(result.duration / step))
    per_bin: dict[str, list[float]] = defaultdict(lambda: [0.0] * n)
    for t, client, amount in result.log.events:
        per_bin[client][min(int(t // step), n - 1)] += amount
    times = [(i + 1) * step for i in range(n)]
    cumulative = {}
    for c in result.client_ids:
        acc, series = 0.0, []
        for v in per_bin[c]:
            acc += v
            series.append(acc)
        cumulative[c] = series
    return times, cumulative

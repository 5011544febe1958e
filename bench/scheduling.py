"""Scheduling speed: policy decisions per second at scale, and simulated requests per
wall-clock second.

    python -m bench.scheduling [--clients 10000] [--queued 100000] [--decisions 200000]

A *decision* is what a scheduler does to admit a request: pick the next one (``peek``
+ ``pop``) and charge its input (``on_admitted``). An *arrival* is ``add``. A *full
cycle* is a decision, one output-token charge, the finish, and one arrival. The queue
stays at ``--queued`` requests over ``--clients`` clients (within 1%). The simulation part replays a
ShareGPT-like workload of ``--sim-requests`` requests on one prefill and one decode
instance (DistServe's OPT-13B A100 profile). Both run pinned to one core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from disagg.scheduling import make_policy, make_pool_policies
from disagg.sim.cluster import ClusterSpec
from disagg.sim.latency import load_profile
from disagg.sim.simulator import Simulator
from disagg.sim.workload import workload_from_spec

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "bench" / "profiles" / "distserve_opt13b_a100.json"


@dataclass(eq=False)
class Req:
    seq_id: int
    client_id: str
    arrival_time: float
    num_prompt_tokens: int = 128
    num_output_tokens: int = 1


@dataclass
class Rates:
    decisions: float  # peek + pop + input charge, per second
    arrivals: float  # add, per second
    cycles: float  # a decision + one output charge + finish + one arrival, per second


BATCH = 1000  # decisions timed between refills, so the queue stays within 1% of --queued


def measure(policy_name: str, clients: int, queued: int, decisions: int) -> Rates:
    rng = random.Random(0)
    names = [f"c{i}" for i in range(clients)]

    def fresh():
        if policy_name == "two-stage-vtc":
            return make_pool_policies("two-stage-vtc").prefill
        return make_policy(policy_name)

    def arrivals(start: int, n: int) -> list[Req]:
        # Made before timing: building request objects is not scheduling work.
        return [Req(start + i, names[rng.randrange(clients)], float(start + i)) for i in range(n)]

    policy = fresh()
    for r in [Req(i, names[i % clients], float(i)) for i in range(queued)]:
        policy.add(r)
    next_id = queued
    decide_s = arrive_s = 0.0
    for _ in range(decisions // BATCH):
        t0 = time.perf_counter()
        for _ in range(BATCH):
            r = policy.peek()
            policy.pop()
            policy.on_admitted(r, r.num_prompt_tokens)
        decide_s += time.perf_counter() - t0
        batch = arrivals(next_id, BATCH)
        next_id += BATCH
        t0 = time.perf_counter()
        for r in batch:
            policy.add(r)
        arrive_s += time.perf_counter() - t0

    policy = fresh()
    for r in [Req(i, names[i % clients], float(i)) for i in range(queued)]:
        policy.add(r)
    batch = arrivals(next_id, decisions)
    t0 = time.perf_counter()
    for new in batch:
        r = policy.peek()
        policy.pop()
        policy.on_admitted(r, r.num_prompt_tokens)
        policy.on_tokens(r, 1)
        policy.on_finished(r)
        policy.add(new)
    cycle_s = time.perf_counter() - t0
    n = decisions // BATCH * BATCH
    return Rates(n / decide_s, n / arrive_s, decisions / cycle_s)


def sharegpt_like(num_requests: int, rate: float) -> dict:
    """Five clients at equal Poisson rates summing to ``rate`` req/s for as long as
    ``num_requests`` take, with ShareGPT-like lognormal lengths (medians 200 in / 250
    out)."""
    duration = num_requests / rate
    rate /= 5
    length = {"dist": "lognormal", "median": 200, "sigma": 1.0, "max": 2048}
    out = {"dist": "lognormal", "median": 250, "sigma": 0.8, "max": 2048}
    return {
        "duration": duration,
        "seed": 0,
        "clients": [
            {
                "id": f"c{i}",
                "arrival": "poisson",
                "rate": rate,
                "input_len": length,
                "output_len": out,
            }
            for i in range(5)
        ],
    }


def simulate_seconds(num_requests: int, rate: float, policy: str) -> tuple[float, int, int]:
    workload = workload_from_spec(sharegpt_like(num_requests, rate))
    latency = load_profile(PROFILE).model(1)
    sim = Simulator(workload, ClusterSpec(kind="disagg"), policy=policy, latency=latency)
    t0 = time.perf_counter()
    result = sim.run()
    wall = time.perf_counter() - t0
    finished = sum(r.finish_time is not None for r in result.requests)
    return wall, len(result.requests), finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--sim-requests", type=int, default=10_000)
    parser.add_argument("--sim-rate", type=float, default=3.0, help="req/s; 1P1D keeps up at ~3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    rates = {
        name: measure(name, args.clients, args.queued, args.decisions)
        for name in ("fcfs", "vtc", "lcf", "two-stage-vtc")
    }
    sims = {
        p: simulate_seconds(args.sim_requests, args.sim_rate, p) for p in ("fcfs", "two-stage-vtc")
    }
    if args.json:
        print(
            json.dumps(
                {
                    "rates_per_s": {name: vars(r) for name, r in rates.items()},
                    "simulation": {
                        p: {"wall_s": w, "requests": n, "finished": f}
                        for p, (w, n, f) in sims.items()
                    },
                },
                indent=2,
            )
        )
        return 0
    print(f"per second, {args.clients} clients, {args.queued} queued requests, one core:")
    print(f"  {'policy':14} {'decisions':>12} {'arrivals':>12} {'full cycles':>12}")
    for name, r in rates.items():
        print(f"  {name:14} {r.decisions:>12,.0f} {r.arrivals:>12,.0f} {r.cycles:>12,.0f}")
    print(
        f"\nShareGPT-like workload at {args.sim_rate} req/s on 1 prefill + 1 decode (OPT-13B A100 profile):"
    )
    for policy, (wall, n, finished) in sims.items():
        print(
            f"  {policy:14} {n} requests ({finished} finished) simulated in {wall:.2f} s "
            f"-> {n / wall:,.0f} requests/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The planner's simulator against the served system, with the machine's noise taken out:
the served nodes are simulated (``disagg serve --simulated``: each model step sleeps the
latency profile's time for its batch, KV moves by message after the profile's transfer
time), so both sides run the same latency model, and what differs is the control plane
(the real coordinator, its dispatch, credit, messaging and timers) and how each side
schedules steps::

    python -m bench.sim_vs_served [--profile bench/profiles/distserve_opt13b_a100.json] \
        [--prefill 1] [--decode 2] [--workload chatbot-like] [--requests 300] \
        [--ttft-slo 0.25] [--tpot-slo 0.1] [--rates R ...]

1. The planner's workload (fixed seed: lengths and Poisson arrival gaps) and the
   planner's :class:`~disagg.planner.goodput.Evaluator` for this deployment (tp 1, the
   simulated nodes' KV bandwidth). Without ``--rates`` the knee is found on a grid (the
   highest rate whose predicted attainment still meets ``--attainment``) and the rates
   driven are 0.7x, 1x and 1.2x of it.
2. The same deployment is served with simulated nodes in a child process; each rate's
   requests are sent at the same arrival times with the same prompt and output lengths
   (``ignore_eos``, ``max_tokens`` = the output length), through ``AsyncClient``. TTFT
   and TPOT are the coordinator's (``Completion.timings``).
3. The table puts served attainment (both SLOs met), P90 TTFT and P90 TPOT beside the
   prediction, with the differences.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.served_process import wait_for_address

DEFAULT_PROFILE = "bench/profiles/distserve_opt13b_a100.json"
BANDWIDTH = 25e9  # the simulated nodes' default KV bandwidth (disagg.simulated)
WARMUP_REQUESTS = 4


def serve(port_file: Path, options: dict) -> None:
    """Child process: serve with simulated nodes until SIGTERM."""
    import logging

    logging.disable(logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    from disagg.serve import ServedCluster, ServeOptions

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    cluster = ServedCluster(ServeOptions(port=0, simulated=True, **options)).start()
    port_file.write_text(cluster.client_address)
    while not stop:
        time.sleep(0.05)
    cluster.stop(drain_timeout=5)


def arrival_times(unit_gaps: tuple[float, ...], rate: float) -> list[float]:
    """Arrival times at ``rate`` req/s, as :meth:`PlanWorkload.at_rate` computes them."""
    import numpy as np

    return [float(t) for t in np.cumsum(np.asarray(unit_gaps)) / rate]


async def drive(address: str, workload, rate: float, seed: int) -> list[tuple[float, float]]:
    """Sends the workload's requests at the simulator's arrival times for ``rate``;
    returns (TTFT, TPOT) per request as the coordinator measured them."""
    from disagg.client import AsyncClient

    rng = random.Random(seed)
    times = arrival_times(workload.unit_gaps, rate)
    results: list[tuple[float, float]] = [(float("inf"), float("inf"))] * len(workload)

    async def one(i: int | None, prompt_len: int, output_len: int, client: AsyncClient) -> None:
        prompt = [rng.randrange(3, 2048) for _ in range(prompt_len)]
        done = await client.generate(
            prompt, client_id="plan", max_tokens=output_len, temperature=0, ignore_eos=True
        )
        if len(done.token_ids) != output_len:  # the work would differ from the simulator's
            raise RuntimeError(f"request {i}: {len(done.token_ids)} tokens, not {output_len}")
        if i is not None:  # None: warm-up
            results[i] = (done.timings.ttft or 0.0, done.timings.tpot or 0.0)

    async with AsyncClient(address, timeout=600) as client:
        await asyncio.gather(*(one(None, 64, 8, client) for _ in range(WARMUP_REQUESTS)))
        tasks = []
        start = time.monotonic() + 0.2
        for i, (t, p, o) in enumerate(
            zip(times, workload.prompt_lens, workload.output_lens, strict=True)
        ):
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, p, o, client)))
        await asyncio.gather(*tasks)
    return results


def knee(meets, low: float, high: float, step: float) -> float:
    """The highest rate on the grid low, low + step, ... <= high that ``meets`` (low
    when none does); ``meets`` need not be monotonic near the knee, so the grid is
    walked from the top."""
    n = round((high - low) / step)
    for k in range(n, -1, -1):
        rate = low + k * step
        if meets(rate):
            return rate
    return low


def served_outcome(results: list[tuple[float, float]], slo):
    """Strict attainment and P90s of served (TTFT, TPOT) pairs, scored as the planner
    scores the simulator's requests (:func:`disagg.planner.goodput.attainment`)."""
    from disagg.planner.goodput import Outcome, _p90

    met = sum(ttft <= slo.ttft and tpot <= slo.tpot for ttft, tpot in results)
    finished = [r for r in results if r[0] != float("inf")]  # P90s over finished ones
    ttfts = [r[0] for r in finished]
    tpots = [r[1] for r in finished]
    return Outcome(met / len(results), _p90(ttfts), _p90(tpots))


def predicted_requests(evaluator, d, rate: float) -> list[tuple[float, float]]:
    """(TTFT, TPOT) of each request in the simulator's run of ``d`` at ``rate``, in
    arrival order (inf when unfinished): the run :meth:`Evaluator.run` scores, built the
    same way for a tp-1, pp-1 disaggregated deployment (the caller checks that its
    attainment is the Evaluator's)."""
    from disagg.sim.cluster import ClusterSpec
    from disagg.sim.simulator import Simulator

    lat = evaluator.latency
    prefill, decode = lat.instance(d.prefill), lat.instance(d.decode)
    spec = ClusterSpec(
        kind="disagg", prefill=d.n_prefill, decode=d.n_decode,
        max_batch_tokens=evaluator.max_batch_tokens, max_batch_size=evaluator.max_batch_size,
        transfer_bandwidth=evaluator.transfer_bandwidth(d), transfer_latency=lat.handoff_s,
        prefill_gap=lat.prefill_gap_s, prefill_jitter=lat.prefill_jitter,
    )  # fmt: skip
    w = evaluator.workload.at_rate(rate, evaluator.drain)
    sim = Simulator(w, spec, policy=evaluator.policy, latency=prefill, decode_latency=decode)
    result = sim.run()
    inf = float("inf")
    by_arrival = sorted(result.requests, key=lambda r: (r.arrival_time, r.seq_id))
    return [
        (r.first_token_time - r.arrival_time + lat.ttft_overhead_s, r.tpot)
        if r.finish_time is not None
        else (inf, inf)
        for r in by_arrival
    ]


def gaps(served: list[float], predicted: list[float]) -> tuple[float, float, float]:
    """Median, P90 and largest |.| of served minus predicted, request by request."""
    import statistics

    diffs = sorted(s - p for s, p in zip(served, predicted, strict=True))
    p90 = statistics.quantiles(diffs, n=10, method="inclusive")[-1]
    return statistics.median(diffs), p90, max(diffs, key=abs)


def relative(served: float | None, predicted: float | None) -> float | None:
    if served is None or not predicted:
        return None
    return (served - predicted) / predicted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="latency profile (JSON)")
    p.add_argument("--model", default="opt-13b", help="the profile's model preset")
    p.add_argument("--gpu", default="a100-80g", help="the profile's GPU preset")
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--workload", default="chatbot-like")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo", type=float, default=0.25, help="seconds (DistServe's OPT-13B)")
    p.add_argument("--tpot-slo", type=float, default=0.1, help="seconds (DistServe's OPT-13B)")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--rates", type=float, nargs="+", help="req/s (default: around the knee)")
    p.add_argument("--serve", nargs=2, metavar=("PORT_FILE", "OPTIONS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), json.loads(args.serve[1]))
        return

    from disagg.planner.goodput import Evaluator, LatencySource, SLOTarget
    from disagg.planner.presets import load_plan_workload, resolve_model
    from disagg.planner.space import Deployment, PhaseConfig
    from disagg.serve import ServeOptions
    from disagg.sim.latency import load_profile
    from disagg.sim.presets import gpu

    t0 = time.monotonic()
    profile = load_profile(args.profile)
    workload = load_plan_workload(args.workload, args.requests, args.seed)
    slo = SLOTarget(args.ttft_slo, args.tpot_slo, args.attainment)
    defaults = ServeOptions()
    evaluator = Evaluator(
        workload,
        LatencySource(resolve_model(args.model), gpu(args.gpu), profile),
        slo,
        defaults.policy,
        BANDWIDTH,
        BANDWIDTH,
        max_batch_tokens=defaults.max_batch_tokens,
        max_batch_size=defaults.max_num_seqs,
    )
    tp1 = PhaseConfig(1, 1)
    d = Deployment(tp1, args.prefill, tp1, args.decode)
    rates = args.rates
    if not rates:
        k = knee(lambda r: evaluator.meets(d, r), 0.5, 40.0, 0.5)
        rates = [round(k * f, 2) for f in (0.7, 1.0, 1.2)]
        print(
            f"predicted knee: {k:.1f} req/s (highest 0.5 req/s step meeting {slo.attainment:.0%})"
        )
    predicted = [evaluator.run(d, r) for r in rates]

    options = dict(
        latency_profile=str(Path(args.profile).resolve()), prefill=args.prefill,
        decode=args.decode, policy=defaults.policy,
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="disagg-simcheck-"))
    port_file = tmp / "address"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.sim_vs_served", "--serve", str(port_file),
         json.dumps(options)],
    )  # fmt: skip
    served = []
    try:
        address = wait_for_address(server, port_file)
        for k, rate in enumerate(rates):
            wall = time.monotonic()
            results = asyncio.run(drive(address, workload, rate, seed=k))
            served.append(results)
            print(f"  served {rate:.2f} req/s in {time.monotonic() - wall:.0f} s")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    print()
    print(
        f"{args.prefill} prefill + {args.decode} decode, tp 1, {Path(args.profile).name}; "
        f"{args.requests} {args.workload} requests (seed {args.seed}); SLOs TTFT "
        f"{slo.ttft * 1e3:.0f} ms, TPOT {slo.tpot * 1e3:.0f} ms; policy {defaults.policy}"
    )
    outcomes = [served_outcome(results, slo) for results in served]
    print(f"{'rate':>8} {'':>10} {'attainment':>10} {'P90 TTFT':>10} {'P90 TPOT':>10}")
    for rate, pred, meas in zip(rates, predicted, outcomes, strict=True):
        print(f"{rate:>8.2f} {'predicted':>10} {pred.attainment:>10.1%} {_ms(pred.ttft_p90)} "
              f"{_ms(pred.tpot_p90)}")  # fmt: skip
        print(f"{'':>8} {'served':>10} {meas.attainment:>10.1%} {_ms(meas.ttft_p90)} "
              f"{_ms(meas.tpot_p90)}")  # fmt: skip
        print(f"{'':>8} {'diff':>10} {(meas.attainment - pred.attainment) * 100:>+8.1f}pp "
              f"{_pct(relative(meas.ttft_p90, pred.ttft_p90))} "
              f"{_pct(relative(meas.tpot_p90, pred.tpot_p90))}")  # fmt: skip
    print()
    print("served minus predicted, request by request: median / P90 / largest")
    for rate, results in zip(rates, served, strict=True):
        mine = predicted_requests(evaluator, d, rate)
        again = served_outcome(mine, slo).attainment
        assert abs(again - evaluator.run(d, rate).attainment) < 1e-9, "not the Evaluator's run"
        ttft = gaps([r[0] for r in results], [r[0] for r in mine])
        tpot = gaps([r[1] for r in results], [r[1] for r in mine])
        print(f"  {rate:.2f} req/s: TTFT " + " / ".join(f"{x * 1e3:+.1f}" for x in ttft)
              + " ms; TPOT " + " / ".join(f"{x * 1e3:+.2f}" for x in tpot) + " ms")  # fmt: skip
    print(f"total {time.monotonic() - t0:.0f} s on {os.cpu_count()} cores (shared)")


def _ms(seconds: float | None) -> str:
    return f"{'-':>10}" if seconds is None else f"{seconds * 1e3:>7.1f} ms"


def _pct(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>+10.1%}"


if __name__ == "__main__":
    main()

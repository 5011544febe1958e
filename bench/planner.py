"""Closing the loop on CPU: profile the tiny model, plan a deployment for SLOs it can
meet on this machine, serve the plan, drive it with the planner's own workload at the
planned rate, and compare what was measured with what the simulator predicted::

    python -m bench.planner [--ttft-slo 0.25] [--tpot-slo 0.02] [--gpus 2] [--tp 1] \
        [--workload code-completion-like] [--requests 300] [--fractions 1.0 0.5] \
        [--calibrate [FRACTION ...]] [--headroom ATTAINMENT]

1. ``disagg profile`` in-process (one torch thread, as a node on this machine gets).
2. ``disagg plan --gpu cpu --latency-profile``: each "GPU" is one node process; the
   cluster is one node of ``--gpus`` of them (2: one per core of this machine).
3. The deployment file is served by ``ServedCluster`` in a child process.
4. The planner's workload (fixed seed: the same requests, lengths and Poisson arrival
   times the planner simulated) is sent at ``fraction x`` the planned goodput; each
   request's TTFT and TPOT are the coordinator's (``Completion.timings``).
5. The simulator runs the same deployment, requests and rate; the table compares P90
   TTFT, P90 TPOT and strict attainment (both SLOs met).

``--calibrate`` inserts, after 2, a served run of that plan with other requests whose
recorded steps and hand-offs refit the profile (``disagg.planner.served``); the plan is
made again from the calibrated profile and both profiles predict each rate.
``--headroom`` also drives the goodput of a plan for that attainment.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.served_process import process_tree_cpu, wait_for_address

WARMUP_REQUESTS = 8


def serve(deployment: Path, port_file: Path, log_file: Path) -> None:
    """Child process: serve ``deployment`` on free ports until SIGTERM, then write the
    coordinator's log of finished requests (client, total s, model-step s) and each
    request's latency breakdown (queue, prefill, decode_queue, transfer, decode) as JSON."""
    import logging

    logging.disable(logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    from disagg.planner.served import ServedRecorder
    from disagg.serve import ServedCluster
    from disagg.serve_cli import add_serve_arguments, serve_options

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    options = serve_options(
        parser.parse_args(["--deployment", str(deployment), "--threads-per-node", "1"])
    )
    options.port, options.node_port = 0, None  # free ports: the machine is shared
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    cluster = ServedCluster(options).start()
    recorder = ServedRecorder().attach(cluster.coordinator)
    port_file.write_text(cluster.client_address)
    while not stop:
        time.sleep(0.05)
    finished = list(cluster.coordinator.finished_log)
    events = cluster.coordinator.events
    breakdowns = [events.breakdown(rid) for rid in list(events._records)]  # arrival order
    served = recorder.log()
    cluster.stop(drain_timeout=5)
    log_file.write_text(
        json.dumps({"finished": finished, "breakdowns": breakdowns, "served": served})
    )


async def drive(address: str, workload, rate: float, seed: int) -> list[tuple[float, float]]:
    """Sends the workload's requests at its arrival times scaled to ``rate``; returns
    (TTFT, TPOT) per request as the coordinator measured them."""
    import numpy as np

    from disagg.client import AsyncClient

    rng = random.Random(seed)
    times = np.cumsum(np.asarray(workload.unit_gaps)) / rate
    results: list[tuple[float, float]] = [(float("inf"), float("inf"))] * len(workload)

    async def one(i: int | None, prompt_len: int, output_len: int, client: AsyncClient) -> None:
        prompt = [rng.randrange(3, 2048) for _ in range(prompt_len)]
        done = await client.generate(
            prompt, client_id="plan", max_tokens=output_len, temperature=0, ignore_eos=True
        )
        if i is not None:  # None: warm-up
            results[i] = (done.timings.ttft or 0.0, done.timings.tpot or 0.0)

    async with AsyncClient(address, timeout=600) as client:
        warm = [one(None, 64, 8, client) for _ in range(WARMUP_REQUESTS)]
        await asyncio.gather(*warm)
        tasks = []
        start = time.monotonic() + 0.2
        for i, (t, p, o) in enumerate(
            zip(times, workload.prompt_lens, workload.output_lens, strict=True)
        ):
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, p, o, client)))
        await asyncio.gather(*tasks)
    return results


def process_cpu(root: int) -> dict[str, float]:
    """CPU seconds of ``root`` (the coordinator's process) and of its node processes by
    role (a node's rank processes counted as the node's): ``process_tree_cpu`` summed
    per role."""
    found: dict[str, float] = {}
    for name, seconds in process_tree_cpu(root).items():
        role = "coordinator" if name == "server" else name.rpartition("-")[0]
        if role in ("coordinator", "prefill", "decode"):
            found[role] = found.get(role, 0.0) + seconds
    return found


def measured_outcome(results: list[tuple[float, float]], slo):
    from disagg.planner.goodput import Outcome, _p90

    met = sum(ttft <= slo.ttft and tpot <= slo.tpot for ttft, tpot in results)
    return Outcome(met / len(results), _p90([r[0] for r in results]), _p90([r[1] for r in results]))


def session(
    deployment: Path, tmp: Path, tag: str, workload, runs: list[tuple[float, int]]
) -> tuple[list[tuple[list[tuple[float, float]], dict[str, float]]], dict]:
    """Serves ``deployment`` in a child process and drives ``workload`` once per
    (rate, seed) of ``runs``; returns each run's (TTFT, TPOT) per request and CPU cores
    per process, and the child's log (finished requests, breakdowns, served log)."""
    port_file, log_file = tmp / f"{tag}.address", tmp / f"{tag}.log.json"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.planner",
            "--serve",
            str(deployment),
            str(port_file),
            str(log_file),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    out = []
    try:
        address = wait_for_address(server, port_file)
        for rate, seed in runs:
            before, mine, wall = process_cpu(server.pid), os.times(), time.monotonic()
            results = asyncio.run(drive(address, workload, rate, seed))
            wall, after, now = time.monotonic() - wall, process_cpu(server.pid), os.times()
            cores = {name: (after[name] - before.get(name, 0.0)) / wall for name in after}
            cores["load generator"] = (now.user + now.system - mine.user - mine.system) / wall
            out.append((results, cores))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    log = json.loads(log_file.read_text()) if log_file.exists() else {}
    return out, log


def run_shares(log: dict, runs: int, requests: int) -> list[tuple[float, float]]:
    """Per run: the share of request time spent in model steps, and the median KV
    hand-off (prefill end to decode admission). The coordinator's log is in finishing
    order: each run's warm-up, then its requests."""
    shares = []
    for k in range(runs):
        first = k * (WARMUP_REQUESTS + requests) + WARMUP_REQUESTS
        part = log.get("finished", [])[first : first + requests]
        total = sum(entry[1] for entry in part)
        share = sum(entry[2] for entry in part) / total if total else float("nan")
        waits = [
            b.get("decode_queue", 0.0) + b.get("transfer", 0.0)
            for b in log.get("breakdowns", [])[first : first + requests]
        ]
        shares.append((share, statistics.median(waits) if waits else float("nan")))
    return shares


def step_ratios(log: dict, runs: int, requests: int, prefill, decode) -> list[tuple[float, ...]]:
    """Per run: served prefill batch time and decode step period over what the profile
    predicts for the same batches (sums over the run), and the decode ratio of the run's
    worst second (of those with >= 5 steps). A ratio that moves within a run is the
    machine, not the model: the profile was fitted once."""
    served = log.get("served", {})
    arrivals = sorted(row[0] for row in served.get("requests", []))
    out = []
    for k in range(runs):
        first = k * (WARMUP_REQUESTS + requests) + WARMUP_REQUESTS
        if first >= len(arrivals):
            out.append((float("nan"),) * 3)
            continue
        lo = arrivals[first]
        nxt = first + requests + WARMUP_REQUESTS
        hi = arrivals[nxt] if nxt < len(arrivals) else float("inf")
        batches = [b for b in served.get("prefill", []) if lo <= b[0] < hi]
        modelled = sum(prefill.prefill_time(int(b[2]), int(b[3]), int(b[4])) for b in batches)
        pre = sum(b[1] for b in batches) / modelled if modelled else float("nan")
        by_node: dict[str, list[list]] = {}
        for row in sorted(served.get("decode", []), key=lambda r: r[1]):
            if lo <= row[1] < hi:
                by_node.setdefault(row[0], []).append(row)
        timed = [  # (second of the run, period, modelled step time)
            (int(row[1] - lo), row[1] - prev[1], decode.decode_time(int(row[3]), int(row[4])))
            for rows in by_node.values()
            for prev, row in itertools.pairwise(rows)
            if prev[5] and row[1] > prev[1]  # the node went straight on: a period
        ]
        dec = sum(t[1] for t in timed) / sum(t[2] for t in timed) if timed else float("nan")
        seconds: dict[int, list[tuple[float, float]]] = {}
        for sec, period, model in timed:
            seconds.setdefault(sec, []).append((period, model))
        worst = max(
            (sum(p for p, _ in v) / sum(m for _, m in v) for v in seconds.values() if len(v) >= 5),
            default=float("nan"),
        )
        out.append((pre, dec, worst))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ttft-slo", type=float, default=0.25, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.02, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument(
        "--gpus", type=int, default=2, help="rank processes the plan may use (one per 'GPU')"
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="profile the engine at this tensor-parallel degree only, so every plan's "
        "instances are tp x 1 rank groups (served as leader + tp rank processes)",
    )
    p.add_argument("--workload", default="code-completion-like")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fractions", type=float, nargs="+", default=[1.0, 0.5], help="of the planned rate"
    )
    p.add_argument("--profile", type=Path, help="use this profile instead of measuring one")
    p.add_argument("--repeats", type=int, default=3, help="profile: timed runs per point")
    p.add_argument(
        "--calibrate",
        type=float,
        nargs="*",
        default=None,
        metavar="FRACTION",
        help="first serve the isolated profile's plan at these fractions of its goodput "
        "(default 1.0 0.5) with other requests (seed + 1), refit the profile on that "
        "service (disagg profile --from-served) and plan and predict with it",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=None,
        metavar="ATTAINMENT",
        help="also plan for this attainment (e.g. 0.99) and drive that plan's rate",
    )
    p.add_argument(
        "--serve", nargs=3, metavar=("DEPLOYMENT", "PORT_FILE", "LOG"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]), Path(args.serve[2]))
        return

    from disagg.deployment import save_deployment
    from disagg.planner.goodput import Evaluator, LatencySource, SLOTarget
    from disagg.planner.plan import PlanRequest, check_request, plan
    from disagg.planner.presets import CPU_NODE, load_plan_workload, resolve_model
    from disagg.planner.report import to_deployment
    from disagg.planner.served import calibrate
    from disagg.planner.space import Cluster
    from disagg.planner.timing import profile_engine
    from disagg.sim.latency import load_profile, save_profile

    tmp = Path(tempfile.mkdtemp(prefix="disagg-planner-"))
    t0 = time.monotonic()
    if args.profile:
        profile = load_profile(args.profile)
        print(f"profile: {args.profile}")
    else:
        result = profile_engine("tiny", "cpu", tp=args.tp, threads=1, repeats=args.repeats)
        profile = result.profile
        save_profile(profile, tmp / "profile.json")
        print(result.summary())
    fit = next(iter(profile.tp.values())).fit_error
    if "prefill_median" in fit:
        print(
            f"fit relative error: prefill median {fit['prefill_median']:.1%} max "
            f"{fit['prefill_max']:.1%}; decode median {fit['decode_median']:.1%} max "
            f"{fit['decode_max']:.1%}"
        )

    workload = load_plan_workload(args.workload, args.requests, args.seed)
    slo = SLOTarget(args.ttft_slo, args.tpot_slo, args.attainment)
    model = resolve_model("tiny")

    def planned_for(prof, target: SLOTarget, name: str):
        req = PlanRequest(
            model=model,
            gpu=CPU_NODE,
            cluster=Cluster(1, args.gpus),
            slo=target,
            workload=workload,
            profile=prof,
        )
        check_request(req)
        planned = plan(req)
        d = planned.best.deployment
        goodput = planned.best.per_gpu_goodput * d.gpus
        print(
            f"plan ({name}): {d.describe()} on {d.gpus} CPU node processes, goodput "
            f"{goodput:.2f} req/s (TTFT {target.ttft * 1e3:.0f} ms, TPOT "
            f"{target.tpot * 1e3:.0f} ms, {target.attainment:.0%} of {args.workload}, "
            f"{args.requests} requests; search {planned.search_seconds:.1f} s)"
        )
        path = tmp / f"deployment-{name.replace(' ', '-')}.yaml"
        save_deployment(to_deployment(planned, "tiny", device="cpu", layout="disaggregated"), path)
        evaluator = Evaluator(
            workload,
            LatencySource(model, CPU_NODE, prof),
            slo,
            req.policy,
            CPU_NODE.intra_node_bandwidth,
            CPU_NODE.intra_node_bandwidth,
        )
        return d, goodput, path, evaluator

    d, goodput, deployment, isolated = planned_for(profile, slo, "isolated profile")
    evaluators = {"isolated": isolated}
    if args.calibrate is not None:
        fractions = args.calibrate or [1.0, 0.5]
        calib_load = load_plan_workload(args.workload, args.requests, args.seed + 1)
        runs = [(goodput * f, 100 + k) for k, f in enumerate(fractions)]
        rates = ", ".join(f"{r:.2f}" for r, _ in runs)
        print(f"calibration: serving that plan at {rates} req/s with other requests (seed + 1)")
        _, log = session(deployment, tmp, "calibration", calib_load, runs)
        (tmp / "served.json").write_text(json.dumps(log.get("served", {})))
        calibration = calibrate(
            profile, log["served"], CPU_NODE.intra_node_bandwidth, tp=str(args.tp)
        )
        print(calibration.summary())
        profile = calibration.profile
        save_profile(profile, tmp / "profile-served.json")
        d, goodput, deployment, evaluators["calibrated"] = planned_for(profile, slo, "calibrated")
    main_name = "calibrated" if "calibrated" in evaluators else "isolated"
    rows = [(f"{f:.0%}", goodput * f) for f in args.fractions]
    if args.headroom:
        target = SLOTarget(args.ttft_slo, args.tpot_slo, args.headroom)
        hd, hgoodput, _, _ = planned_for(profile, target, f"headroom {args.headroom:.0%}")
        if hd != d:
            print("the headroom plan chose another deployment; its rate is served on this one")
        rows.append((f"plan@{args.headroom:.0%}", hgoodput))

    measured_runs, log = session(
        deployment, tmp, "evaluation", workload, [(rate, k) for k, (_, rate) in enumerate(rows)]
    )
    extra = run_shares(log, len(rows), len(workload))
    main_source = LatencySource(model, CPU_NODE, profile)
    ratios = step_ratios(
        log, len(rows), len(workload), main_source.instance(d.prefill),
        main_source.instance(d.decode) if d.decode else main_source.instance(d.prefill),
    )  # fmt: skip

    print()
    print(f"served: {d.describe()}; predictions by the {', '.join(evaluators)} profile(s)")
    header = f"{'rate':>18} {'':>11} {'P90 TTFT':>9} {'P90 TPOT':>9} {'attainment':>10}"
    print(header + f" {'in model':>9} {'KV hand-off':>11}")
    for (label, rate), (results, _), (share, handoff) in zip(
        rows, measured_runs, extra, strict=True
    ):
        meas = measured_outcome(results, slo)
        head = f"{rate:.2f} ({label})"
        for name, evaluator in evaluators.items():
            pred = evaluator.run(d, rate / d.replicas)
            print(f"{head:>18} {name:>11} {_ms(pred.ttft_p90)} {_ms(pred.tpot_p90)} "
                  f"{pred.attainment:>10.1%}")  # fmt: skip
            head = ""
            if name == main_name:
                main_pred = pred
        print(f"{'':>18} {'measured':>11} {_ms(meas.ttft_p90)} {_ms(meas.tpot_p90)} "
              f"{meas.attainment:>10.1%} {share:>9.0%} {handoff * 1e3:>8.1f} ms")  # fmt: skip
        print(
            f"{'':>18} {'error':>11} {_rel(meas.ttft_p90, main_pred.ttft_p90):>9} "
            f"{_rel(meas.tpot_p90, main_pred.tpot_p90):>9} "
            f"{(meas.attainment - main_pred.attainment) * 100:>+8.1f}pp"
        )
    print()
    print(f"served step time / the {main_name} profile's model, per run (1.00: as fitted)")
    for (_, rate), (pre, dec, worst) in zip(rows, ratios, strict=True):
        print(f"  {rate:.2f} req/s: prefill batches {pre:.2f}, decode steps {dec:.2f} "
              f"(worst second {worst:.2f})")  # fmt: skip
    print()
    print("CPU cores used during each run (this machine has", os.cpu_count(), "cores)")
    for (_, rate), (_, cores) in zip(rows, measured_runs, strict=True):
        used = ", ".join(f"{name} {value:.2f}" for name, value in sorted(cores.items()))
        print(f"  {rate:.2f} req/s: {used}; total {sum(cores.values()):.2f}")
    print(f"total {time.monotonic() - t0:.0f} s; files in {tmp}")


def _ms(seconds: float | None) -> str:
    return f"{'-':>9}" if seconds is None else f"{seconds * 1e3:>6.1f} ms"


def _rel(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return "-"
    return f"{(measured - predicted) / predicted:+.0%}"


if __name__ == "__main__":
    main()

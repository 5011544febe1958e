"""Closing the loop on CPU: profile the tiny model, plan a deployment for SLOs it can
meet on this machine, serve the plan, drive it with the planner's own workload at the
planned rate, and compare what was measured with what the simulator predicted::

    python -m bench.planner [--ttft-slo 0.25] [--tpot-slo 0.02] [--gpus 2] \
        [--workload code-completion-like] [--requests 300] [--fractions 1.0 0.5]

1. ``disagg profile`` in-process (one torch thread, as a node on this machine gets).
2. ``disagg plan --gpu cpu --latency-profile``: each "GPU" is one node process; the
   cluster is one node of ``--gpus`` of them (2: one per core of this machine).
3. The deployment file is served by ``ServedCluster`` in a child process.
4. The planner's workload (fixed seed: the same requests, lengths and Poisson arrival
   times the planner simulated) is sent at ``fraction x`` the planned goodput; each
   request's TTFT and TPOT are the coordinator's (``Completion.timings``).
5. The simulator runs the same deployment, requests and rate; the table compares P90
   TTFT, P90 TPOT and strict attainment (both SLOs met).
"""

from __future__ import annotations

import argparse
import asyncio
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
    port_file.write_text(cluster.client_address)
    while not stop:
        time.sleep(0.05)
    finished = list(cluster.coordinator.finished_log)
    events = cluster.coordinator.events
    breakdowns = [events.breakdown(rid) for rid in list(events._records)]  # arrival order
    cluster.stop(drain_timeout=5)
    log_file.write_text(json.dumps({"finished": finished, "breakdowns": breakdowns}))


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
    """CPU seconds (user + system) of ``root`` (the coordinator's process) and of its
    node processes, from /proc (Linux); empty elsewhere."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if pid == root:
            found["coordinator"] = seconds
        elif ppid == root:
            role = "prefill" if "prefill_node" in cmd else "decode" if "decode_node" in cmd else ""
            if role:
                found[role] = found.get(role, 0.0) + seconds
    return found


def measured_outcome(results: list[tuple[float, float]], slo):
    from disagg.planner.goodput import Outcome, _p90

    met = sum(ttft <= slo.ttft and tpot <= slo.tpot for ttft, tpot in results)
    return Outcome(met / len(results), _p90([r[0] for r in results]), _p90([r[1] for r in results]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ttft-slo", type=float, default=0.25, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.02, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--gpus", type=int, default=2, help="node processes the plan may use")
    p.add_argument("--workload", default="code-completion-like")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fractions", type=float, nargs="+", default=[1.0, 0.5], help="of the planned rate"
    )
    p.add_argument("--profile", type=Path, help="use this profile instead of measuring one")
    p.add_argument("--repeats", type=int, default=3, help="profile: timed runs per point")
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
    from disagg.planner.profile import profile_engine
    from disagg.planner.report import to_deployment
    from disagg.planner.space import Cluster
    from disagg.sim.latency import load_profile, save_profile

    tmp = Path(tempfile.mkdtemp(prefix="disagg-planner-"))
    t0 = time.monotonic()
    if args.profile:
        profile = load_profile(args.profile)
        print(f"profile: {args.profile}")
    else:
        result = profile_engine("tiny", "cpu", threads=1, repeats=args.repeats)
        profile = result.profile
        save_profile(profile, tmp / "profile.json")
        print(result.summary())
    fit = profile.tp["1"].fit_error
    if fit:
        print(
            f"fit relative error: prefill median {fit['prefill_median']:.1%} max "
            f"{fit['prefill_max']:.1%}; decode median {fit['decode_median']:.1%} max "
            f"{fit['decode_max']:.1%}"
        )

    workload = load_plan_workload(args.workload, args.requests, args.seed)
    slo = SLOTarget(args.ttft_slo, args.tpot_slo, args.attainment)
    req = PlanRequest(
        model=resolve_model("tiny"),
        gpu=CPU_NODE,
        cluster=Cluster(1, args.gpus),
        slo=slo,
        workload=workload,
        profile=profile,
    )
    check_request(req)
    planned = plan(req)
    d = planned.best.deployment
    goodput = planned.best.per_gpu_goodput * d.gpus
    print(
        f"plan: {d.describe()} on {d.gpus} CPU node processes, goodput {goodput:.2f} req/s "
        f"(TTFT {slo.ttft * 1e3:.0f} ms, TPOT {slo.tpot * 1e3:.0f} ms, "
        f"{slo.attainment:.0%} of {args.workload}, {args.requests} requests; "
        f"search {planned.search_seconds:.1f} s)"
    )
    deployment = tmp / "deployment.yaml"
    save_deployment(to_deployment(planned, "tiny", device="cpu"), deployment)

    evaluator = Evaluator(
        workload,
        LatencySource(req.model, req.gpu, profile),
        slo,
        req.policy,
        CPU_NODE.intra_node_bandwidth,
        CPU_NODE.intra_node_bandwidth,
    )
    port_file, log_file = tmp / "address", tmp / "finished.json"
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
    rows = []
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists() or not port_file.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the served system did not start")
            time.sleep(0.1)
        address = port_file.read_text()
        for k, fraction in enumerate(args.fractions):
            rate = goodput * fraction
            predicted = evaluator.run(d, rate / d.replicas)
            before, mine, wall = process_cpu(server.pid), os.times(), time.monotonic()
            measured = measured_outcome(asyncio.run(drive(address, workload, rate, k)), slo)
            wall, after, now = time.monotonic() - wall, process_cpu(server.pid), os.times()
            cores = {name: (after[name] - before.get(name, 0.0)) / wall for name in after}
            cores["load generator"] = (now.user + now.system - mine.user - mine.system) / wall
            rows.append((fraction, rate, predicted, measured, cores))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    # The coordinator's log, in finishing order: each rate's warm-up, then its requests.
    log = json.loads(log_file.read_text()) if log_file.exists() else {}
    shares, handoffs = [], []
    for k in range(len(rows)):
        first = k * (WARMUP_REQUESTS + len(workload)) + WARMUP_REQUESTS
        part = log.get("finished", [])[first : first + len(workload)]
        total = sum(entry[1] for entry in part)
        shares.append(sum(entry[2] for entry in part) / total if total else float("nan"))
        # Prefill end to decode admission: KV waiting to be pulled, then moved.
        waits = [
            b.get("decode_queue", 0.0) + b.get("transfer", 0.0)
            for b in log.get("breakdowns", [])[first : first + len(workload)]
        ]
        handoffs.append(statistics.median(waits) if waits else float("nan"))

    print()
    header = f"{'rate':>13} {'':>10} {'P90 TTFT':>9} {'P90 TPOT':>9} {'attainment':>10}"
    print(header + f" {'in model':>9} {'KV hand-off':>11}")
    for (fraction, rate, pred, meas, _), share, handoff in zip(rows, shares, handoffs, strict=True):
        label = f"{rate:.2f} ({fraction:.0%})"
        print(f"{label:>13} {'predicted':>10} {_ms(pred.ttft_p90)} {_ms(pred.tpot_p90)} "
              f"{pred.attainment:>10.1%}")  # fmt: skip
        print(f"{'':>13} {'measured':>10} {_ms(meas.ttft_p90)} {_ms(meas.tpot_p90)} "
              f"{meas.attainment:>10.1%} {share:>9.0%} {handoff * 1e3:>8.1f} ms")  # fmt: skip
        print(
            f"{'':>13} {'error':>10} {_rel(meas.ttft_p90, pred.ttft_p90):>9} "
            f"{_rel(meas.tpot_p90, pred.tpot_p90):>9} "
            f"{(meas.attainment - pred.attainment) * 100:>+8.1f}pp"
        )
    print()
    print("CPU cores used during each run (this machine has", os.cpu_count(), "cores)")
    for _, rate, *_, cores in rows:
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

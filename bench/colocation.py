"""Does disaggregation pay off here? The planner's best disaggregated deployment and its
best colocated one on the same number of node processes, served on this machine one
after the other, driven with the same requests at the same rising rates::

    python -m bench.colocation [--ttft-slo 0.25] [--tpot-slo 0.02] [--gpus 2] \
        [--workload code-completion-like] [--requests 300] \
        [--fractions 0.5 0.75 1.0 1.25] [--profile PROFILE.json]

1. ``disagg profile`` in-process (one torch thread, as a node gets), or ``--profile``.
2. ``disagg plan --gpu cpu``: each "GPU" is one node process, ``--gpus`` of them; the
   plan's best disaggregated and best colocated deployments are written (``-o
   --layout disaggregated`` / ``--layout colocated``).
3. Each is served in a child process (``bench.planner``'s ``session``) and driven with
   the planner's own workload (fixed seed) at ``fraction x`` the larger of the two
   planned goodputs, so both see the same rates.
4. Per rate: measured and predicted P90 TTFT, P90 TPOT and attainment for both. Per
   deployment: goodput per node (the rate where measured attainment crosses the target,
   interpolated between the grid's rates; ">=" when even the top rate met it) beside the
   plan's; and the disaggregated / colocated ratio, measured and predicted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.planner import _ms, _rel, measured_outcome, session


def crossing(rates: list[float], attainments: list[float], target: float) -> tuple[float, bool]:
    """The rate at which attainment falls below ``target`` (linear between grid points),
    and whether it is only a lower bound (every rate met the target). 0.0 when even the
    lowest rate missed it."""
    if attainments[0] < target:
        return 0.0, False
    for k in range(1, len(rates)):
        if attainments[k] < target:
            a0, a1, r0, r1 = attainments[k - 1], attainments[k], rates[k - 1], rates[k]
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1), False
    return rates[-1], True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ttft-slo", type=float, default=0.25, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.02, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--gpus", type=int, default=2, help="node processes each deployment gets")
    p.add_argument("--workload", default="code-completion-like")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.5, 0.75, 1.0, 1.25],
        help="of the larger planned goodput",
    )
    p.add_argument("--profile", type=Path, help="use this profile instead of measuring one")
    p.add_argument("--repeats", type=int, default=3, help="profile: timed runs per point")
    args = p.parse_args()

    from disagg.deployment import save_deployment
    from disagg.planner.goodput import Evaluator, LatencySource, SLOTarget
    from disagg.planner.plan import PlanRequest, check_request, plan
    from disagg.planner.presets import CPU_NODE, load_plan_workload, resolve_model
    from disagg.planner.report import to_deployment
    from disagg.planner.space import Cluster
    from disagg.planner.timing import profile_engine
    from disagg.sim.latency import load_profile, save_profile

    tmp = Path(tempfile.mkdtemp(prefix="disagg-colocation-"))
    t0 = time.monotonic()
    if args.profile:
        profile = load_profile(args.profile)
        print(f"profile: {args.profile}")
    else:
        measured = profile_engine("tiny", "cpu", threads=1, repeats=args.repeats)
        profile = measured.profile
        save_profile(profile, tmp / "profile.json")
        print(measured.summary())

    workload = load_plan_workload(args.workload, args.requests, args.seed)
    slo = SLOTarget(args.ttft_slo, args.tpot_slo, args.attainment)
    model = resolve_model("tiny")
    req = PlanRequest(
        model=model,
        gpu=CPU_NODE,
        cluster=Cluster(1, args.gpus),
        slo=slo,
        workload=workload,
        profile=profile,
    )
    check_request(req)
    planned = plan(req)
    if planned.colocated is None:
        raise SystemExit("the plan has no colocated layout for this cluster")
    evaluator = Evaluator(
        workload,
        LatencySource(model, CPU_NODE, profile),
        slo,
        req.policy,
        CPU_NODE.intra_node_bandwidth,
        CPU_NODE.intra_node_bandwidth,
    )
    layouts = {}
    for kind, scored in (("disaggregated", planned.best), ("colocated", planned.colocated)):
        path = tmp / f"deployment-{kind}.yaml"
        save_deployment(to_deployment(planned, "tiny", device="cpu", layout=kind), path)
        d = scored.deployment
        layouts[kind] = (d, scored.per_gpu_goodput, path)
        print(
            f"plan, {kind}: {d.describe()} on {d.gpus} node processes, predicted goodput "
            f"{scored.per_gpu_goodput:.2f} req/s per node"
        )
    print(
        f"planner: disaggregated / colocated = {planned.ratio:.2f} (TTFT "
        f"{slo.ttft * 1e3:.0f} ms, TPOT {slo.tpot * 1e3:.0f} ms, {slo.attainment:.0%} of "
        f"{args.workload}, {args.requests} requests)"
    )
    top = max(g * layouts[k][0].gpus for k, (_, g, _) in layouts.items())
    rates = [top * f for f in args.fractions]

    print()
    header = f"{'rate':>10} {'':>14} {'':>9} {'P90 TTFT':>9} {'P90 TPOT':>9} {'attainment':>10}"
    print(header)
    goodput: dict[str, tuple[float, bool]] = {}
    for kind, (d, _, path) in layouts.items():
        runs, _ = session(path, tmp, kind, workload, [(r, k) for k, r in enumerate(rates)])
        attained = []
        for rate, (results, _cores) in zip(rates, runs, strict=True):
            meas = measured_outcome(results, slo)
            pred = evaluator.run(d, rate / d.replicas)
            attained.append(meas.attainment)
            print(f"{rate:>10.2f} {kind:>14} {'predicted':>9} {_ms(pred.ttft_p90)} "
                  f"{_ms(pred.tpot_p90)} {pred.attainment:>10.1%}")  # fmt: skip
            print(f"{'':>10} {'':>14} {'measured':>9} {_ms(meas.ttft_p90)} "
                  f"{_ms(meas.tpot_p90)} {meas.attainment:>10.1%}")  # fmt: skip
            print(f"{'':>10} {'':>14} {'error':>9} {_rel(meas.ttft_p90, pred.ttft_p90):>9} "
                  f"{_rel(meas.tpot_p90, pred.tpot_p90):>9} "
                  f"{(meas.attainment - pred.attainment) * 100:>+8.1f}pp")  # fmt: skip
        goodput[kind] = crossing(rates, attained, slo.attainment)

    print()
    print(f"{'':>14} {'goodput/node measured':>22} {'predicted':>10}")
    for kind, (d, predicted, _) in layouts.items():
        rate, lower = goodput[kind]
        per_node = f"{'>=' if lower else ''}{rate / d.gpus:.2f}"
        print(f"{kind:>14} {per_node:>22} {predicted:>10.2f}")
    (gd, lower_d), (gc, lower_c) = goodput["disaggregated"], goodput["colocated"]
    dn, cn = layouts["disaggregated"][0].gpus, layouts["colocated"][0].gpus
    if gc > 0 and gd > 0 and not (lower_d or lower_c):
        measured_ratio = (gd / dn) / (gc / cn)
        error = (planned.ratio - measured_ratio) / measured_ratio
        print(
            f"disaggregated / colocated: measured {measured_ratio:.2f}, planner "
            f"{planned.ratio:.2f} ({error:+.0%}); the planner's choice "
            f"({'disaggregated' if planned.ratio >= 1 else 'colocated'}) "
            f"{'measures better' if (planned.ratio >= 1) == (measured_ratio >= 1) else 'does NOT measure better'}"
        )
    else:
        print(
            "disaggregated / colocated: no measured ratio (a goodput is only a lower bound, "
            "or even the lowest rate missed the target); move --fractions"
        )
    print(f"machine: {os.cpu_count()} cores, shared; total {time.monotonic() - t0:.0f} s; "
          f"files in {tmp}")  # fmt: skip


if __name__ == "__main__":
    main()

"""``disagg plan``: the placement search from the command line."""

from __future__ import annotations

import argparse
import json

from disagg.deployment import POLICIES, save_deployment
from disagg.planner.goodput import SLOTarget
from disagg.planner.plan import PlanRequest, check_request, plan
from disagg.planner.presets import (
    CPU_NODE,
    HARDWARE,
    MODELS,
    WORKLOADS,
    load_plan_workload,
    resolve_gpu,
    resolve_model,
)
from disagg.planner.report import LAYOUTS, chosen_layout, format_table, to_deployment, to_json
from disagg.planner.space import Cluster
from disagg.sim.latency import load_profile

DEFAULT_REQUESTS = 300  # per simulation; DistServe's simulator uses 300 as well


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help=f"preset ({', '.join(MODELS)}) or a config.json / model dir"
    )
    p.add_argument(
        "--gpu",
        required=True,
        help=f"GPU preset: {', '.join(HARDWARE)} (cpu: one CPU node process per 'GPU'; "
        "needs --latency-profile from `disagg profile --device cpu`)",
    )
    p.add_argument("--nodes", type=int, required=True, help="nodes in the cluster")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs in each node")
    p.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    p.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    p.add_argument(
        "--attainment", type=float, default=0.9, help="share of requests meeting both (0.9)"
    )
    p.add_argument(
        "--workload",
        required=True,
        help=f"preset ({', '.join(WORKLOADS)}) or a JSON list of "
        "{prompt_len, output_len[, start_time]}",
    )
    p.add_argument("--rate", type=float, help="req/s the deployment must serve")
    p.add_argument("--latency-profile", help="fitted profile JSON (default: the analytic roofline)")
    p.add_argument("--affinity", choices=["high", "low", "auto"], default="auto")
    p.add_argument("--policy", choices=POLICIES, default="two-stage-vtc")
    p.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"requests per simulation (default {DEFAULT_REQUESTS})",
    )
    p.add_argument("--seed", type=int, default=0, help="workload sampling seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-o", "--output", help="write the deployment file (YAML) here")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="which deployment -o writes (auto: colocated when its goodput per GPU is higher)",
    )
    p.add_argument(
        "--serve-model",
        help="the model the deployment file names (default: --model)",
    )


def run_plan(args: argparse.Namespace) -> int:
    workload = load_plan_workload(args.workload, args.requests, args.seed)
    req = PlanRequest(
        model=resolve_model(args.model),
        gpu=resolve_gpu(args.gpu),
        cluster=Cluster(args.nodes, args.gpus_per_node),
        slo=SLOTarget(args.ttft_slo, args.tpot_slo, args.attainment),
        workload=workload,
        policy=args.policy,
        affinity=args.affinity,
        profile=load_profile(args.latency_profile) if args.latency_profile else None,
        rate=args.rate,
    )
    check_request(req)
    result = plan(req)
    if args.output:
        device = "cpu" if req.gpu is CPU_NODE else "cuda"
        deployment = to_deployment(result, args.serve_model or args.model, device, args.layout)
        save_deployment(deployment, args.output)
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print(format_table(result))
        if args.output:
            kind = chosen_layout(result, args.layout)
            print(f"{kind} deployment written to {args.output}")
    return 0

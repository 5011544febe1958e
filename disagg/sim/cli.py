"""``disagg simulate``: run a workload through a simulated cluster and report."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from disagg.errors import ConfigError
from disagg.scheduling import COLOCATED_POLICIES, DISAGGREGATED_POLICIES, FairnessConfig, LinearCost
from disagg.sim.cluster import ClusterSpec
from disagg.sim.latency import AnalyticLatency, LatencyModel, load_profile
from disagg.sim.metrics import SLO, summarize
from disagg.sim.presets import gpu, model_shape, model_shape_from_config
from disagg.sim.simulator import Simulator
from disagg.sim.workload import load_workload

POLICY_CHOICES = sorted(set(COLOCATED_POLICIES) | set(DISAGGREGATED_POLICIES))


@dataclass(frozen=True)
class CapacityOverride:
    """A latency model with its KV capacity replaced (e.g. VTC's 10,000-token pool)."""

    base: LatencyModel
    kv_capacity_tokens: int

    @property
    def tp(self) -> int:
        return self.base.tp

    @property
    def pp(self) -> int:
        return self.base.pp

    @property
    def kv_bytes_per_token(self) -> int:
        return self.base.kv_bytes_per_token

    def prefill_time(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> float:
        return self.base.prefill_time(num_tokens, sum_sq_tokens, batch_size)

    def decode_time(self, batch_size: int, total_context: int) -> float:
        return self.base.decode_time(batch_size, total_context)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", required=True, help="workload spec (JSON) or trace (JSONL)")
    p.add_argument("--policy", required=True, choices=POLICY_CHOICES)
    p.add_argument("--cluster", choices=["colocated", "disagg"], default="colocated")
    p.add_argument("--instances", type=int, default=1, help="colocated instances")
    p.add_argument("--prefill", type=int, default=1, help="prefill instances (disagg)")
    p.add_argument("--decode", type=int, default=1, help="decode instances (disagg)")
    p.add_argument(
        "--gpus",
        type=int,
        help="GPUs available; the instances' tp x pp GPUs must fit in them (default: no limit)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--latency-profile", help="fitted profile JSON (docs/latency-model.md)")
    src.add_argument("--model", help="model preset or Hugging Face config.json, for the roofline")
    p.add_argument("--gpu", default="a100-80g", help="GPU preset for the roofline")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (prefill, or all)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (prefill, or all)")
    p.add_argument("--decode-tp", type=int, help="decode instances' tensor-parallel degree")
    p.add_argument("--decode-pp", type=int, help="decode instances' pipeline-parallel degree")
    p.add_argument("--kv-capacity", type=int, help="KV tokens per instance (overrides the model's)")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--chunked-prefill", type=int, help="colocated: prompt tokens per mixed step")
    p.add_argument(
        "--admission",
        choices=["optimistic", "reserve"],
        default="optimistic",
        help="admit when the prompt fits (and preempt later), or only when prompt + output fit",
    )
    p.add_argument("--transfer-bandwidth", type=float, default=25.0, help="KV transfer GB/s")
    p.add_argument(
        "--publish-interval", type=float, help="two-stage: counter publication period (s)"
    )
    p.add_argument("--w-in", type=float, default=1.0, help="cost of an input token")
    p.add_argument("--w-out", type=float, default=2.0, help="cost of an output token")
    p.add_argument("--rpm-limit", type=int, default=60, help="rpm: requests per minute per client")
    p.add_argument("--ttft-slo", type=float, help="seconds")
    p.add_argument("--tpot-slo", type=float, help="seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="DIR", help="write PNG figures into DIR")


def build_latency(args: argparse.Namespace, tp: int, pp: int) -> LatencyModel:
    if args.latency_profile:
        model: LatencyModel = load_profile(args.latency_profile).model(tp, pp)
    else:
        name = args.model or "llama-2-7b"
        shape = model_shape_from_config(name) if _is_config_path(name) else model_shape(name)
        model = AnalyticLatency(shape, gpu(args.gpu), tp, pp)
        if not model.fits and args.kv_capacity is None:
            raise ConfigError("model", model.why)
    if args.kv_capacity is not None:
        if args.kv_capacity < 1:
            raise ConfigError("kv_capacity", f"must be >= 1, got {args.kv_capacity}")
        model = CapacityOverride(model, args.kv_capacity)
    return model


def _is_config_path(name: str) -> bool:
    return name.endswith(".json") or Path(name).is_dir()


def gpus_needed(args: argparse.Namespace) -> tuple[int, str]:
    """GPUs the cluster occupies, and how that count is made up."""
    if args.cluster == "colocated":
        return args.instances * args.tp * args.pp, (
            f"{args.instances} instances x tp {args.tp} x pp {args.pp}"
        )
    dtp, dpp = decode_degrees(args)
    need = args.prefill * args.tp * args.pp + args.decode * dtp * dpp
    return need, (
        f"{args.prefill} prefill x tp {args.tp} x pp {args.pp} + "
        f"{args.decode} decode x tp {dtp} x pp {dpp}"
    )


def decode_degrees(args: argparse.Namespace) -> tuple[int, int]:
    """The decode instances' (tp, pp): their own when given (0 included, to be refused),
    else the prefill instances'."""
    return (
        args.tp if args.decode_tp is None else args.decode_tp,
        args.pp if args.decode_pp is None else args.decode_pp,
    )


def check_gpus(args: argparse.Namespace) -> None:
    if args.gpus is None:
        return
    if args.gpus < 1:
        raise ConfigError("gpus", f"must be an integer >= 1, got {args.gpus}")
    need, how = gpus_needed(args)
    if need > args.gpus:
        raise ConfigError(
            "gpus",
            f"the cluster needs {need} GPUs ({how}) but --gpus is {args.gpus}; "
            f"give --gpus >= {need} or fewer or smaller instances",
        )


def run_simulate(args: argparse.Namespace) -> int:
    workload = load_workload(args.workload)
    if not args.transfer_bandwidth > 0:  # checked here to report it in GB/s, as given
        raise ConfigError("transfer_bandwidth", f"must be > 0 GB/s, got {args.transfer_bandwidth}")
    cluster = ClusterSpec(
        kind=args.cluster,
        instances=args.instances,
        prefill=args.prefill,
        decode=args.decode,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        chunked_prefill=args.chunked_prefill,
        transfer_bandwidth=args.transfer_bandwidth * 1e9,
        publish_interval=args.publish_interval,
        admission=args.admission,
    )
    latency = build_latency(args, args.tp, args.pp)
    decode_latency = None
    if args.cluster == "disagg" and decode_degrees(args) != (args.tp, args.pp):
        try:
            decode_latency = build_latency(args, *decode_degrees(args))
        except ConfigError as exc:  # say which flag: --decode-tp, not --tp
            if exc.field not in ("tp", "pp"):
                raise
            raise ConfigError(f"decode_{exc.field}", exc.reason) from None
    check_gpus(args)
    slo = None
    if (args.ttft_slo is None) != (args.tpot_slo is None):
        raise ConfigError("ttft_slo", "give both --ttft-slo and --tpot-slo, or neither")
    if args.ttft_slo is not None:
        for name in ("ttft_slo", "tpot_slo"):
            if not getattr(args, name) > 0:
                raise ConfigError(name, f"must be > 0 seconds, got {getattr(args, name)}")
        slo = SLO(args.ttft_slo, args.tpot_slo)
    fairness = FairnessConfig(cost=LinearCost(args.w_in, args.w_out), rpm_limit=args.rpm_limit)
    t0 = time.perf_counter()
    result = Simulator(
        workload,
        cluster,
        policy=args.policy,
        latency=latency,
        decode_latency=decode_latency,
        fairness=fairness,
    ).run()
    wall = time.perf_counter() - t0
    summary = summarize(result, slo)
    summary["wall_seconds"] = wall
    if args.plot:
        from disagg.sim.plots import write_plots

        summary["plots"] = [str(p) for p in write_plots(result, args.plot)]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    def fmt(v: float | None, unit: str = "", scale: float = 1.0) -> str:
        return "-" if v is None else f"{v * scale:.1f}{unit}"

    lines = [
        f"{s['policy']} on a {s['cluster']} cluster, {s['duration']:.0f} s: "
        f"{s['finished']} finished, {s['unfinished']} unfinished, {s['rejected']} rejected, "
        f"{s['preemptions']} preemptions",
        f"{'client':>12} {'weight':>6} {'service':>10} {'svc/s':>8} {'done':>5} "
        f"{'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} {'TPOT p90':>9}",
    ]
    for cid, c in s["clients"].items():
        lines.append(
            f"{cid:>12} {c['weight']:>6g} {c['service']:>10.0f} {c['service'] / s['duration']:>8.1f} "
            f"{c['requests']:>5} {fmt(c['ttft_p50'], ' s'):>9} {fmt(c['ttft_p90'], ' s'):>9} "
            f"{fmt(c['tpot_p50'], ' ms', 1e3):>9} {fmt(c['tpot_p90'], ' ms', 1e3):>9}"
        )
    lines.append(
        f"service difference (weighted tokens/s): max {s['max_service_diff']:.1f}, "
        f"avg {s['avg_service_diff']:.1f}; max while both backlogged: "
        f"{fmt(s['max_backlogged_service_diff'])}; Jain {fmt(s['jain_index'], '', 1)}"
    )
    lines.append(f"throughput {s['throughput_tokens_per_s']:.1f} output tokens/s")
    if s["slo_attainment"] is not None:
        lines.append(f"SLO attainment (TTFT and TPOT both met): {s['slo_attainment']:.1%}")
    lines.append(f"simulated in {s['wall_seconds']:.2f} s")
    return "\n".join(lines)

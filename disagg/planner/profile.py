"""``disagg profile``: the command line. It times the engine and fits the latency
profile (:mod:`disagg.planner.timing`, :mod:`disagg.planner.fit`), or, with
``--from-served``, refits a profile on a served log (:mod:`disagg.planner.served`)."""

from __future__ import annotations

from disagg.errors import ConfigError
from disagg.planner.timing import ProfileGrid, profile_engine


def add_arguments(p) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="Hugging Face model directory, a .gguf file, 'smollm2-135m-instruct' or 'tiny'",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel degree: tp gloo/NCCL rank processes"
    )
    p.add_argument(
        "--pp", type=int, default=1, help="pipeline stages: tp x pp gloo/NCCL rank processes"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, as a node gets them (default 1: one per node on CPU)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks, as a node's")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds, not minutes)")
    p.add_argument(
        "--from-served",
        metavar="LOG",
        help="instead of timing the engine, refit --base on a served log (ServedRecorder's "
        "JSON, e.g. from bench.planner --calibrate) and measure handoff_s and ttft_overhead_s",
    )
    p.add_argument("--base", metavar="PROFILE", help="with --from-served: the profile to refit")
    p.add_argument(
        "--transfer-bandwidth",
        type=float,
        default=None,
        help="with --from-served: bytes/s the simulator charges a KV transfer, taken out of "
        "the measured hand-off (default: the cpu node's, 0.66e9)",
    )
    p.add_argument("-o", "--output", required=True, help="profile JSON to write")


QUICK_GRID = dict(
    prefill_batches=(1, 4),
    prefill_lens=(16, 128, 512),
    decode_batches=(1, 8, 32),
    decode_contexts=(64, 512),
)


def run_profile(args) -> int:
    from disagg.sim.latency import save_profile

    if args.from_served:
        return _run_from_served(args)
    grid = None
    if args.quick:
        grid = ProfileGrid.product(**QUICK_GRID)
    result = profile_engine(
        args.model,
        args.device,
        tp=args.tp,
        pp=args.pp,
        threads=args.threads,
        grid=grid,
        repeats=args.repeats,
        dtype=args.dtype,
        num_blocks=args.num_blocks,
    )
    save_profile(result.profile, args.output)
    print(result.summary())
    print(f"profile written to {args.output}")
    return 0


def _run_from_served(args) -> int:
    from disagg.planner.presets import CPU_NODE
    from disagg.planner.served import calibrate, load_served_log
    from disagg.sim.latency import load_profile, save_profile

    if not args.base:
        raise ConfigError("--base", "--from-served refits a profile: name it with --base")
    bandwidth = args.transfer_bandwidth or CPU_NODE.intra_node_bandwidth
    result = calibrate(
        load_profile(args.base), load_served_log(args.from_served), bandwidth, tp=str(args.tp)
    )
    save_profile(result.profile, args.output)
    print(result.summary())
    print(f"profile written to {args.output}")
    return 0

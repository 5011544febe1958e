"""The ``disagg`` command line. Each subcommand parses its own arguments and calls into
the package; nothing here holds logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from disagg.errors import DisaggError


def _make_tiny_model(args: argparse.Namespace) -> int:
    from disagg.engine.tiny_model import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed)
    print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not args.offline:
        from disagg.showcase import run_showcase

        return run_showcase(model=args.model, dtype=args.dtype, duration=args.duration)
    from disagg.demo import run_demo
    from disagg.showcase import demo_dtype

    return run_demo(
        model=args.model,
        device=args.device,
        dtype=demo_dtype(args.model, args.dtype, args.device),
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
    )


def _simulate(args: argparse.Namespace) -> int:
    from disagg.sim.cli import run_simulate

    return run_simulate(args)


def _serve(args: argparse.Namespace) -> int:
    from disagg.serve_cli import run_serve_command

    return run_serve_command(args)


def _generate(args: argparse.Namespace) -> int:
    from disagg.serve_cli import run_generate

    return run_generate(args)


def _http(args: argparse.Namespace) -> int:
    from disagg.http.server import run_http_command

    return run_http_command(args)


def _plan(args: argparse.Namespace) -> int:
    from disagg.planner.cli import run_plan

    return run_plan(args)


def _status(args: argparse.Namespace) -> int:
    from disagg.status import run_status

    return run_status(args.metrics)


def _profile(args: argparse.Namespace) -> int:
    from disagg.planner.profile import run_profile

    return run_profile(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg", description="Prefill/decode-disaggregated LLM serving, fair between clients."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "make-tiny-model",
        help="write a small random-weight Llama checkpoint with a trained BPE tokenizer",
    )
    p.add_argument("dir", help="output directory (created; must be empty if it exists)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser(
        "demo",
        help="serve a model to a heavy and two light clients under FCFS and two-stage VTC "
        "(--offline: generate offline and print outputs and tokens/s)",
    )
    p.add_argument("--offline", action="store_true", help="the offline engine demo instead")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per policy (served)")
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="smollm2-135m-instruct (default), tiny (random weights, fast), a .gguf file "
        "or a Hugging Face model directory",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 for a trained model on a CPU with bfloat16 instructions "
        "(faster decoding, measured in bench/smollm2_dtype.py), else the engine's default",
    )
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=_demo)

    from disagg.sim.cli import add_arguments as add_simulate_arguments

    p = sub.add_parser("simulate", help="simulate a serving cluster under a workload and a policy")
    add_simulate_arguments(p)
    p.set_defaults(func=_simulate)
    from disagg.serve_cli import add_generate_arguments, add_serve_arguments

    p = sub.add_parser(
        "serve", help="start a coordinator with prefill and decode nodes on this machine"
    )
    add_serve_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("generate", help="send one prompt to a served system and stream the output")
    add_generate_arguments(p)
    p.set_defaults(func=_generate)

    from disagg.http.server import add_arguments as add_http_arguments

    p = sub.add_parser(
        "http",
        help="serve the OpenAI-compatible HTTP API as a gateway to a running coordinator",
    )
    add_http_arguments(p)
    p.set_defaults(func=_http)

    p = sub.add_parser("status", help="nodes, queues and per-client service and SLO attainment")
    p.add_argument(
        "--metrics",
        default="http://127.0.0.1:9400/metrics",
        help="the server's metrics endpoint (disagg serve --metrics-port)",
    )
    p.set_defaults(func=_status)

    from disagg.planner.cli import add_arguments as add_plan_arguments

    p = sub.add_parser(
        "plan", help="choose per-phase parallelism and instance counts that maximise goodput"
    )
    add_plan_arguments(p)
    p.set_defaults(func=_plan)

    from disagg.planner.profile import add_arguments as add_profile_arguments

    p = sub.add_parser(
        "profile", help="time the engine over a batch grid and fit the latency profile"
    )
    add_profile_arguments(p)
    p.set_defaults(func=_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DisaggError as exc:
        print(f"disagg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

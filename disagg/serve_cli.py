"""Arguments and entry points of ``disagg serve`` and ``disagg generate``."""

from __future__ import annotations

import argparse
import sys

from disagg.coordinator.auth import ClientLimits
from disagg.errors import ConfigError, DisaggError
from disagg.serve import POLICIES, ServeOptions, run_serve


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="Hugging Face model directory, a .gguf file, 'smollm2-135m-instruct' or 'tiny'",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="N",
        help="tokens per request (prompt + output); default: the model's context length",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    # Default 1 each, or 0 with --colocated (None here: a count given beside --colocated
    # is a mix, refused by name).
    p.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill nodes (1)")
    p.add_argument("--decode", type=int, default=None, metavar="M", help="decode nodes (1)")
    p.add_argument(
        "--colocated",
        type=int,
        default=0,
        metavar="K",
        help="K colocated nodes (prefill and decode on each) instead of prefill/decode nodes",
    )
    for role in ("prefill", "decode", "colocated"):
        p.add_argument(
            f"--{role}-tp", type=int, default=1, metavar="N",
            help=f"tensor-parallel ranks of each {role} node",
        )  # fmt: skip
        p.add_argument(
            f"--{role}-pp", type=int, default=1, metavar="N",
            help=f"pipeline stages of each {role} node",
        )  # fmt: skip
    p.add_argument("--policy", default="two-stage-vtc", choices=POLICIES)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555, help="client port (nodes: +1, KV: +2)")
    p.add_argument("--deployment", help="deployment file written by `disagg plan -o`")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus exporter port")
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the OpenAI-compatible HTTP API on this port (docs/openai-api.md)",
    )
    p.add_argument("--api-keys", help="API-key file (key -> client id, weight, limits)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per node")
    p.add_argument("--threads-per-node", type=int, default=None)
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on shutdown")
    p.add_argument("--log-dir", default=None, help="write node logs here")
    p.add_argument(
        "--no-restart-nodes",
        dest="restart_nodes",
        action="store_false",
        help="leave a node process that dies dead (default: start it again)",
    )
    p.add_argument(
        "--ttft-slo", type=float, default=None, help="seconds (overrides the deployment's)"
    )
    p.add_argument(
        "--tpot-slo", type=float, default=None, help="seconds (overrides the deployment's)"
    )
    limits = p.add_argument_group("per-client limits (without --api-keys; a key file sets its own)")
    limits.add_argument("--max-in-flight-per-client", type=int, default=None, metavar="N")
    # The flag's old name, refused by name so a script using it does not lose its limit.
    limits.add_argument("--max-queued-per-client", type=int, default=None, help=argparse.SUPPRESS)
    limits.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N")
    limits.add_argument("--max-tokens-limit", type=int, default=None, metavar="N")
    limits.add_argument("--requests-per-minute", type=int, default=None, metavar="N")
    p.add_argument(
        "--external-nodes",
        action="store_true",
        help="start no nodes here: print each node's command line (to run on other machines) "
        "and wait for them",
    )
    p.add_argument(
        "--advertise-host",
        default=None,
        help="the host name nodes use to reach this server when --host is 0.0.0.0 "
        "(default: this machine's name)",
    )
    p.add_argument(
        "--curve-secret-key",
        default=None,
        metavar="FILE",
        help="CurveZMQ keypair (NAME.key_secret): encrypt both endpoints; clients need NAME.key",
    )
    p.add_argument(
        "--events-log",
        default=None,
        metavar="FILE",
        help="append each finished or failed request's lifetime events and latency breakdown "
        "to FILE, one JSON line per request (docs/operations.md)",
    )
    sim = p.add_argument_group("simulated nodes (the real coordinator, nodes that sleep)")
    sim.add_argument(
        "--simulated",
        action="store_true",
        help="run --prefill + --decode simulated nodes in one process: each model step "
        "sleeps the latency profile's time for its batch; tokens are deterministic",
    )
    sim.add_argument("--latency-profile", default=None, metavar="FILE", help="for --simulated")
    sim.add_argument("--simulated-tp", type=int, default=1, metavar="N", help="profile's tp")
    sim.add_argument("--max-num-seqs", type=int, default=None, metavar="N", help="decode batch cap")
    p.add_argument(
        "--reject-over-slo",
        type=float,
        default=None,
        metavar="FACTOR",
        help="reject at once a request whose predicted TTFT exceeds FACTOR x the TTFT SLO",
    )


def _count(given: int | None, colocated: int) -> int:
    return given if given is not None else (0 if colocated else 1)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    fields = dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        prefill=_count(args.prefill, args.colocated),
        decode=_count(args.decode, args.colocated),
        colocated=args.colocated,
        policy=args.policy,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        api_keys=args.api_keys,
        num_blocks=args.num_blocks,
        threads_per_node=args.threads_per_node,
        drain_timeout=args.drain_timeout,
        log_dir=args.log_dir,
        restart_nodes=args.restart_nodes,
        events_log=args.events_log,
        http_port=args.http_port,
        simulated=args.simulated,
        latency_profile=args.latency_profile,
        simulated_tp=args.simulated_tp,
        layouts={
            role: (getattr(args, f"{role}_tp"), getattr(args, f"{role}_pp"))
            for role in ("prefill", "decode", "colocated")
        },
    )
    if args.max_num_seqs is not None:
        fields["max_num_seqs"] = args.max_num_seqs
    if args.max_model_len is not None:
        fields["max_model_len"] = args.max_model_len
    if args.deployment:
        from disagg.deployment import load_deployment

        dep = load_deployment(args.deployment)
        fields.update(
            model=dep.model,
            device=dep.device,
            policy=dep.policy,
            prefill=dep.prefill.instances if dep.prefill else 0,
            decode=dep.decode.instances if dep.decode else 0,
            colocated=dep.colocated.instances if dep.colocated else 0,
            cluster_secret=dep.cluster_secret,
            node_devices={f"{n.role}-{n.index}": n.devices for n in dep.nodes if n.devices},
            layouts={
                role: (layout.tp, layout.pp)
                for role in ("prefill", "decode", "colocated")
                if (layout := getattr(dep, role)) is not None
            },
            slo=(dep.slo.ttft_s, dep.slo.tpot_s) if dep.slo else None,
        )
        if dep.coordinator is not None:
            fields.update(
                host=dep.coordinator.host,
                port=dep.coordinator.client_port,
                node_port=dep.coordinator.node_port,
            )
    if args.ttft_slo is not None or args.tpot_slo is not None:
        base = fields.get("slo") or (float("inf"), float("inf"))
        fields["slo"] = (
            args.ttft_slo if args.ttft_slo is not None else base[0],
            args.tpot_slo if args.tpot_slo is not None else base[1],
        )
    fields["reject_over_slo"] = args.reject_over_slo
    fields["curve_secret_key"] = args.curve_secret_key
    fields["external_nodes"] = args.external_nodes
    if args.max_queued_per_client is not None:
        raise ConfigError("--max-queued-per-client", "renamed to --max-in-flight-per-client")
    limit_values = {
        "max_in_flight_per_client": args.max_in_flight_per_client,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_tokens": args.max_tokens_limit,
        "requests_per_minute": args.requests_per_minute,
    }
    for name, value in limit_values.items():
        if value is not None and value < 1:
            raise ConfigError(name, f"must be an integer >= 1, got {value}")
    if any(v is not None for v in limit_values.values()):
        fields["client_limits"] = ClientLimits(**limit_values)
    if args.advertise_host:
        fields["advertise_host"] = args.advertise_host
    return ServeOptions(**fields)


def run_serve_command(args: argparse.Namespace) -> int:
    return run_serve(serve_options(args))


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--client-id", default="default")
    p.add_argument("--address", default="tcp://127.0.0.1:5555")
    p.add_argument("--api-key", default=None)
    p.add_argument("--server-key", default=None, help="the server's CurveZMQ public key file")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds")


def run_generate(args: argparse.Namespace) -> int:
    from disagg.client import Client

    sampling = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    if args.stop:
        sampling["stop"] = args.stop
    with Client(
        args.address, timeout=args.timeout, api_key=args.api_key, server_key=args.server_key
    ) as client:
        stream = client.stream(args.prompt, client_id=args.client_id, **sampling)
        try:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            done = stream.completion
        except DisaggError:
            sys.stdout.write("\n")
            raise
    t = done.timings
    ttft = f"{t.ttft * 1000:.1f} ms" if t.ttft is not None else "-"
    tpot = f"{t.tpot * 1000:.1f} ms" if t.tpot is not None else "-"
    print(
        f"\n[{len(done.token_ids)} tokens, finish {done.finish_reason}; TTFT {ttft}, "
        f"TPOT {tpot}; prefill {done.nodes.prefill}, decode {done.nodes.decode}]",
        file=sys.stderr,
    )
    return 0

"""``python -m disagg.simulated``: many simulated nodes in this one process, registered
with a coordinator (``disagg serve --simulated`` starts this for you)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

import zmq.asyncio

from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.node.settings import CLUSTER_SECRET_ENV
from disagg.sim.latency import load_profile
from disagg.simulated.base import SimNode, SimSpec
from disagg.simulated.decode import SimDecode
from disagg.simulated.prefill import SimPrefill

DEFAULT_BANDWIDTH = 25e9  # bytes/s between two instances when the profile says nothing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m disagg.simulated", description=__doc__)
    p.add_argument("--coordinator", required=True, help="the coordinator's node endpoint")
    p.add_argument("--latency-profile", required=True, help="a latency profile (JSON)")
    p.add_argument(
        "--model", required=True, help="model directory (vocabulary, tokenizer, max length)"
    )
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of each node")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, help="KV bytes/s")
    return p.parse_args(argv)


def build_nodes(args: argparse.Namespace, ctx: zmq.asyncio.Context) -> list[SimNode]:
    profile = load_profile(args.latency_profile)
    config = ModelConfig.from_dir(args.model)
    spec = SimSpec(
        latency=profile.model(args.tp),
        block_size=args.block_size,
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=config.max_context,
        vocab_size=config.vocab_size,
        eos_token_ids=tuple(config.eos_token_ids),
        bandwidth_bytes_per_s=args.bandwidth,
        handoff_s=profile.handoff_s if profile.handoff_s is not None else 1e-4,
        tokenizer=Tokenizer.from_dir(args.model),
    )
    common = dict(
        spec=spec,
        coordinator=args.coordinator,
        ctx=ctx,
        model=f"simulated:{profile.model_name or 'profile'}:tp{args.tp}",
        secret=os.environ.get(CLUSTER_SECRET_ENV),
    )
    nodes: list[SimNode] = [SimPrefill(f"prefill-{i}", **common) for i in range(args.prefill)]
    nodes += [SimDecode(f"decode-{i}", **common) for i in range(args.decode)]
    return nodes


async def serve(args: argparse.Namespace) -> None:
    ctx = zmq.asyncio.Context()
    nodes = build_nodes(args, ctx)
    try:
        await asyncio.gather(*(node.run() for node in nodes))
    finally:
        ctx.term()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", "WARNING"))
    args = parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()

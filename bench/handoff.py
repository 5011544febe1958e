"""KV hand-off between parallel layouts: a tp2 -> pp2 hand-off against the homogeneous
tp2 -> tp2 one of the same bytes, side by side in one run, over gloo pair channels.

    python -m bench.handoff [--tokens 2048] [--repeats 7] [--layers 8] [--kv-heads 8]

Four processes on this machine: prefill ranks 0 and 1 (tp = 2: each holds half the KV
heads of every layer) and decode ranks 0 and 1, which hold the KV either as pp = 2 (half
the layers, every head: the *hetero* case, four rank pairs, each piece staged and
scattered on the decode side) or as tp = 2 (the *homo* case, two rank pairs, straight
from pool to pool). Every pair is a ``PairGroups`` gloo group of its own and every piece
one ``send_piece`` / ``recv_piece`` on a ``make_backend("gloo")`` channel, each rank's
run by ``move_rank_pieces`` (``disagg.engine.parallel.handoff_kv``: a thread per peer). A
hand-off is timed on each decode rank from a common barrier to its last piece, the
slower rank counts, the cases alternate, and the median of ``--repeats`` is kept. After
the last repeat each decode rank checks its pool against the KV it should hold.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disagg.engine.kv_cache import KVCache, KVCacheSpec
from disagg.engine.parallel.handoff import HandoffPlan, KVNodeLayout, Piece, plan_handoff
from disagg.engine.parallel.handoff_kv import move_rank_pieces
from kv_transfer import PairGroups, make_backend
from kv_transfer.layout import ByteBuffer

TIMEOUT_S = 120.0
SLACK = 1.25  # pools hold 25% more blocks than the request; ids shuffled on both sides
DECODE = {"hetero": (1, 2), "homo": (2, 1)}  # decode (tp, pp); prefill is tp2 in both


def _node(args: argparse.Namespace, tp: int, pp: int) -> KVNodeLayout:
    return KVNodeLayout(
        model="bench",
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        dtype="bfloat16",
        tp=tp,
        pp=pp,
    )


def _full_kv(args: argparse.Namespace, num_blocks: int) -> torch.Tensor:
    """The whole model's KV pool, the same in every process (seeded)."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.layers, 2, num_blocks, args.block_size, args.kv_heads, args.head_dim)
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def _pool(node: KVNodeLayout, rank: int, num_blocks: int, full: torch.Tensor | None) -> KVCache:
    layers, heads = node.rank_kv(rank)
    spec = KVCacheSpec(
        len(layers), len(heads), node.head_dim, node.block_size, torch.bfloat16,
        first_layer=layers.start, first_kv_head=heads.start,
    )  # fmt: skip
    pool = KVCache(spec, num_blocks, torch.device("cpu"))
    if full is not None:
        pool.data.copy_(full[layers.start : layers.stop, :, :, :, heads.start : heads.stop])
    return pool


def _barrier(store: dist.Store, name: str, world: int) -> None:
    if store.add(name, 1) == world:
        store.set(name + "/go", "1")
    store.wait([name + "/go"])


def _worker(role: str, rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=TIMEOUT_S))
        me = f"{role}-{rank}@0"
        groups = PairGroups(f"127.0.0.1:{port}", me, "gloo", TIMEOUT_S)
        prefill = _node(args, 2, 1)
        plans = {case: plan_handoff(prefill, _node(args, *DECODE[case])) for case in DECODE}
        n = -(-args.tokens // args.block_size)
        pool_blocks = int(n * SLACK)
        rng = random.Random(1)
        src_ids, dst_ids = rng.sample(range(pool_blocks), n), rng.sample(range(pool_blocks), n)
        full = _full_kv(args, pool_blocks)
        if role == "prefill":
            pools = {case: _pool(prefill, rank, pool_blocks, full) for case in plans}
        else:
            pools = {case: _pool(plans[case].decode, rank, pool_blocks, None) for case in plans}
        mine = {case: _my_pieces(plan, role, rank) for case, plan in plans.items()}
        # One channel per rank pair (formed once, both sides in the same order).
        channels: dict[int, tuple[Any, int]] = {}  # by the peer's rank in its node
        for peer in sorted({_peer(p, role) for ps in mine.values() for p in ps}):
            group, index = groups.form(f"{'decode' if role == 'prefill' else 'prefill'}-{peer}@0")
            channels[peer] = (make_backend("gloo", group=group), index)
        staging = {peer: ByteBuffer(torch.device("cpu")) for peer in channels}
        times: dict[str, list[float]] = {case: [] for case in plans}
        for i in range(args.repeats):
            for case in plans:
                _barrier(store, f"{case}/{i}", 4)
                start = time.perf_counter()
                move_rank_pieces(
                    "send" if role == "prefill" else "recv", f"{case}-{i}", pools[case],
                    mine[case], src_ids if role == "prefill" else dst_ids, channels,
                    num_tokens=args.tokens, timeout=TIMEOUT_S, staging=staging,
                )  # fmt: skip
                times[case].append(time.perf_counter() - start)
        ok = True
        if role == "decode":
            for case, plan in plans.items():
                layers, heads = plan.decode.rank_kv(rank)
                want = full[layers.start : layers.stop, :, src_ids][
                    ..., heads.start : heads.stop, :
                ]
                ok = ok and torch.equal(pools[case].data[:, :, dst_ids], want)
        _barrier(store, "done", 4)
        nbytes = {case: plan.nbytes(n) for case, plan in plans.items()}
        out.put((role, rank, True, (times, ok, nbytes)))
    except BaseException:
        out.put((role, rank, False, traceback.format_exc()))


def _my_pieces(plan: HandoffPlan, role: str, rank: int) -> list[Piece]:
    return plan.from_rank(rank) if role == "prefill" else plan.to_rank(rank)


def _peer(piece: Piece, role: str) -> int:
    return piece.dst_rank if role == "prefill" else piece.src_rank


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=TIMEOUT_S))
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(role, r, store.port, args, out), daemon=True)
        for role in ("prefill", "decode")
        for r in (0, 1)
    ]
    try:
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    failed = [f"{role} {r}:\n{payload}" for role, r, ok, payload in results if not ok]
    if failed:
        raise RuntimeError("\n".join(failed))
    decode = [payload for role, _, _, payload in results if role == "decode"]
    rows: dict[str, Any] = {}
    for case in DECODE:
        per_repeat = [max(ts) for ts in zip(*(d[0][case] for d in decode), strict=True)]
        nbytes = decode[0][2][case]
        rows[case] = {
            "MiB": nbytes / 2**20,
            "median_s": statistics.median(per_repeat),
            "GBps": nbytes / statistics.median(per_repeat) / 1e9,
            "best_GBps": nbytes / min(per_repeat) / 1e9,
        }
    rows["correct"] = all(d[1] for d in decode)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args(argv)
    rows = run(args)
    print(
        f"KV hand-off over gloo pair channels, prefill tp2 -> decode, {args.tokens} tokens, "
        f"{args.layers} layers x {args.kv_heads} KV heads x {args.head_dim}, bf16, "
        f"{args.repeats} repeats (goal: hetero >= 80% of homo)"
    )
    print(f"  {'case':22} {'MiB':>6} {'median GB/s':>11} {'best GB/s':>9}")
    names = {"hetero": "tp2 -> pp2 (4 pairs)", "homo": "tp2 -> tp2 (2 pairs)"}
    for case, name in names.items():
        r = rows[case]
        print(f"  {name:22} {r['MiB']:>6.1f} {r['GBps']:>11.2f} {r['best_GBps']:>9.2f}")
    ratio = rows["hetero"]["GBps"] / rows["homo"]["GBps"]
    best = rows["hetero"]["best_GBps"] / rows["homo"]["best_GBps"]
    print(f"  hetero / homo: median {ratio:.0%}, best {best:.0%}; pools correct: {rows['correct']}")
    return 0 if rows["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""KV transfer bandwidth: a request's paged KV moved layer by layer against one raw
torch.distributed send/recv of a contiguous tensor of the same bytes, in one run.

    python -m bench.kv_transfer [--cases tiny-512,8b-bf16-4k] [--repeats 5] [--threads 1]

Two processes on this machine join a gloo group through a TCPStore on a free port.
*paged*: ``P2PBackend.send``/``recv`` (header and verdicts, gather -> send -> recv ->
scatter per layer, pipelined), block ids shuffled on both sides. *raw*: ``dist.send`` /
``dist.recv`` of one contiguous tensor. Both are timed on the receiver from a barrier to
the end of the call, alternating, and the median of ``--repeats`` is kept. *gather* and
*scatter* are the local copy rates alone (no channel), for the profile.

With CUDA the same script also compares the CUDA IPC backend (two processes on GPU 0:
gather from the peer's mapped pool -> scatter, per layer) against one device-to-device
``copy_`` of the same bytes from the peer's memory (``--no-cuda`` skips it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disagg.engine.kv_cache import KVCache, KVCacheSpec
from kv_transfer import KVPoolHandle, init_transfer_group, make_backend
from kv_transfer.blocks import BlockMover
from kv_transfer.layout import KVLayout, StagingBuffers
from kv_transfer.p2p import DEFAULT_PIPELINE_DEPTH, layers_per_message

TIMEOUT_S = 120.0
SLACK_BLOCKS = 0.25  # pools hold 25% more blocks than the request, ids shuffled


@dataclass(frozen=True)
class Case:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    tokens: int
    block_size: int = 16

    @property
    def spec(self) -> KVCacheSpec:
        return KVCacheSpec(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
            getattr(torch, self.dtype),
        )

    @property
    def blocks(self) -> int:
        return -(-self.tokens // self.block_size)

    @property
    def nbytes(self) -> int:
        return self.blocks * self.spec.bytes_per_block

    @property
    def layout(self) -> str:
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]
        return f"{self.num_layers}L {self.num_kv_heads}H {self.head_dim}D {dtype}"


CASES = {
    c.name: c
    for c in [
        Case("tiny-512", 4, 2, 32, "float32", 512),  # the embedded tiny model
        Case("tiny-2048", 4, 2, 32, "float32", 2048),
        Case("8b-bf16-1k", 32, 8, 128, "bfloat16", 1024),  # a Llama-3-8B-like layout
        Case("8b-bf16-4k", 32, 8, 128, "bfloat16", 4096),
        Case("8b-fp32-1k", 32, 8, 128, "float32", 1024),
        Case("8b-fp32-4k", 32, 8, 128, "float32", 4096),
    ]
}


@dataclass
class Row:
    case: str
    layout: str
    tokens: int
    mib: float
    paged_gbps: float  # median
    raw_gbps: float  # median
    ratio: float  # of the medians
    paged_best_gbps: float  # fastest repeat: the least disturbed by other processes
    raw_best_gbps: float
    best_ratio: float
    handshake_ms: float  # receiver: until the header (and its extension) was in
    gather_gbps: float = float("nan")
    scatter_gbps: float = float("nan")
    paged_cpu_ms: float = float("nan")  # CPU time of both processes (all threads), median
    raw_cpu_ms: float = float("nan")

    @classmethod
    def of(cls, case: Case, paged: list[float], raw: list[float], handshake: list[float]) -> Row:
        med = [case.nbytes / statistics.median(t) / 1e9 for t in (paged, raw)]
        best = [case.nbytes / min(t) / 1e9 for t in (paged, raw)]
        return cls(
            case.name,
            case.layout,
            case.tokens,
            case.nbytes / 2**20,
            med[0],
            med[1],
            med[0] / med[1],
            best[0],
            best[1],
            best[0] / best[1],
            statistics.median(handshake) * 1e3,
        )


def _pool_and_ids(case: Case, seed: int, device: str) -> tuple[KVCache, list[int]]:
    pool_blocks = case.blocks + max(1, int(case.blocks * SLACK_BLOCKS))
    cache = KVCache(case.spec, pool_blocks, torch.device(device))
    g = torch.Generator().manual_seed(seed)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    ids = torch.randperm(pool_blocks, generator=g)[: case.blocks].tolist()
    return cache, ids


def _copy_rates(case: Case, cache: KVCache, ids: list[int], repeats: int) -> tuple[float, float]:
    """Local gather-only and scatter-only GB/s, message by message as the p2p backend
    does (the profile columns; best of ``repeats``)."""
    layout = KVLayout.of(cache.layers)
    idx = torch.tensor(ids, device=cache.data.device)
    mover = BlockMover(cache.layers, layout, idx)
    per = layers_per_message(layout.num_layers, layout.layer_bytes(len(ids)))
    buf = StagingBuffers().get(layout, len(ids), layers=per, count=1)[0]
    firsts = range(0, layout.num_layers, per)
    gather, scatter = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for first in firsts:
            mover.gather(first, buf[: min(per, layout.num_layers - first)])
        gather.append(time.perf_counter() - start)
        start = time.perf_counter()
        for first in firsts:
            mover.scatter(buf[: min(per, layout.num_layers - first)], first)
        scatter.append(time.perf_counter() - start)
    return case.nbytes / min(gather) / 1e9, case.nbytes / min(scatter) / 1e9


def _gloo_case(rank: int, case: Case, repeats: int, depth: int) -> Row | None:
    cache, ids = _pool_and_ids(case, seed=rank, device="cpu")
    flat = torch.empty(case.nbytes, dtype=torch.uint8)
    backend = make_backend("gloo", pipeline_depth=depth)
    paged: list[float] = []
    raw: list[float] = []
    cpu = torch.zeros(2, repeats, dtype=torch.float64)  # (paged, raw) CPU s of this process
    handshake: list[float] = []
    for rep in range(repeats + 1):  # the first round warms up buffers and connections
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        if rank == 0:
            backend.send(rep, cache.layers, ids, 1, num_tokens=case.tokens, timeout=TIMEOUT_S)
        else:
            stats = backend.recv(
                rep, cache.layers, ids, 0, num_tokens=case.tokens, timeout=TIMEOUT_S
            )
            handshake.append(stats.handshake_seconds)
        t_paged, cpu_paged = time.perf_counter() - start, time.process_time() - cpu_start
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        if rank == 0:
            dist.send(flat, 1)
        else:
            dist.recv(flat, 0)
        t_raw, cpu_raw = time.perf_counter() - start, time.process_time() - cpu_start
        if rep:
            paged.append(t_paged)
            raw.append(t_raw)
            cpu[:, rep - 1] = torch.tensor([cpu_paged, cpu_raw])
    backend.close()
    if rank == 0:
        dist.send(cpu, 1)
        return None
    sender_cpu = torch.empty_like(cpu)
    dist.recv(sender_cpu, 0)
    both = (cpu + sender_cpu).median(dim=1).values * 1e3
    row = Row.of(case, paged, raw, handshake[1:])
    row.gather_gbps, row.scatter_gbps = _copy_rates(case, cache, ids, repeats)
    row.paged_cpu_ms, row.raw_cpu_ms = both.tolist()
    return row


def _ipc_case(rank: int, group: Any, case: Case, repeats: int) -> Row | None:
    cache, ids = _pool_and_ids(case, seed=rank, device="cuda")
    key = f"bench/pool/{case.name}"
    if rank == 0:
        backend = make_backend("cuda_ipc", device="cuda", pool=cache.data)
        group.store.set(key, backend.export_pool().to_bytes())
    else:
        backend = make_backend("cuda_ipc", device="cuda")
        backend.attach_peer_pool(0, KVPoolHandle.from_bytes(group.store.get(key)))
    peer = backend.peer_pool(0) if rank == 1 else None
    src_flat = peer.view(-1)[: case.nbytes // peer.element_size()] if peer is not None else None
    dst_flat = torch.empty_like(src_flat) if src_flat is not None else None
    paged: list[float] = []
    raw: list[float] = []
    handshake: list[float] = []
    for rep in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            backend.send(rep, cache.layers, ids, 1, num_tokens=case.tokens, timeout=TIMEOUT_S)
        else:
            stats = backend.recv(
                rep, cache.layers, ids, 0, num_tokens=case.tokens, timeout=TIMEOUT_S
            )
            handshake.append(stats.handshake_seconds)
        t_paged = time.perf_counter() - start
        t_raw = 0.0
        if rank == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst_flat.copy_(src_flat)
            torch.cuda.synchronize()
            t_raw = time.perf_counter() - start
        if rep:
            paged.append(t_paged)
            raw.append(t_raw)
    dist.barrier()
    backend.close()
    del peer, src_flat, dst_flat
    dist.barrier()  # the consumer let go of the mapping before the producer may exit
    if rank == 0:
        return None
    return Row.of(case, paged, raw, handshake[1:])


def _worker(
    rank: int,
    port: int,
    mode: str,
    cases: list[Case],
    repeats: int,
    threads: int,
    depth: int,
    out: Any,
) -> None:
    try:
        torch.set_num_threads(threads)
        group = init_transfer_group(
            rank, 2, f"127.0.0.1:{port}", "gloo", timeout=TIMEOUT_S, host_store=False
        )
        rows = []
        for case in cases:
            row = (
                _gloo_case(rank, case, repeats, depth)
                if mode == "gloo"
                else _ipc_case(rank, group, case, repeats)
            )
            if row is not None:
                rows.append(asdict(row))
        group.destroy()
        out.put((rank, True, rows))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def run(mode: str, cases: list[Case], repeats: int, threads: int, depth: int) -> list[Row]:
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=60))
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, store.port, mode, cases, repeats, threads, depth, out),
            daemon=True,
        )
        for rank in (0, 1)
    ]
    try:
        for p in procs:
            p.start()
        results = dict((rank, (ok, rows)) for rank, ok, rows in (out.get() for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for rank, (ok, payload) in results.items():
        if not ok:
            raise RuntimeError(f"rank {rank} failed:\n{payload}")
    return [Row(**r) for r in results[1][1]]


def print_table(title: str, rows: list[Row], profile: bool) -> None:
    print(title)
    cols = (
        f"  {'case':11} {'layout':17} {'tokens':>6} {'MiB':>6} | {'paged':>6} {'raw':>6} "
        f"{'ratio':>5} | {'paged':>6} {'raw':>6} {'ratio':>5} | {'header':>6}"
    )
    print(f"  {'':43} | {'median GB/s':^19} | {'best GB/s':^19} | {'ms':>6}", end="")
    print(f" | {'local copy GB/s':^15} | {'CPU ms, both':^13}" if profile else "")
    print(cols + (f" | {'gather':>7} {'scatter':>7} | {'paged':>6} {'raw':>6}" if profile else ""))
    for r in rows:
        line = (
            f"  {r.case:11} {r.layout:17} {r.tokens:>6} {r.mib:>6.1f} | {r.paged_gbps:>6.2f} "
            f"{r.raw_gbps:>6.2f} {r.ratio:>5.0%} | {r.paged_best_gbps:>6.2f} "
            f"{r.raw_best_gbps:>6.2f} {r.best_ratio:>5.0%} | {r.handshake_ms:>6.2f}"
        )
        if profile:
            line += (
                f" | {r.gather_gbps:>7.2f} {r.scatter_gbps:>7.2f} | {r.paged_cpu_ms:>6.1f} "
                f"{r.raw_cpu_ms:>6.1f}"
            )
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES)
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--depth", type=int, default=DEFAULT_PIPELINE_DEPTH, help="p2p messages in flight"
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA IPC comparison")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    cases = [CASES[c] for c in args.cases.split(",")]
    rows = {"gloo": run("gloo", cases, args.repeats, args.threads, args.depth)}
    print_table(
        f"KV transfer over gloo, 2 processes, {args.threads} torch thread(s) each, "
        f"pipeline depth {args.depth}, {args.repeats} repeats (goal: paged >= 50% of raw)",
        rows["gloo"],
        profile=True,
    )
    if torch.cuda.is_available() and not args.no_cuda:
        rows["cuda_ipc"] = run("cuda_ipc", cases, args.repeats, args.threads, args.depth)
        print_table(
            f"\nKV transfer over CUDA IPC on {torch.cuda.get_device_name(0)}, 2 processes, "
            f"{args.repeats} repeats (raw: one D2D copy_; goal: paged >= 70% of raw)",
            rows["cuda_ipc"],
            profile=False,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: [asdict(r) for r in v] for k, v in rows.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

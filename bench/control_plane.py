"""Control-plane throughput: requests/s through client -> coordinator -> prefill node ->
KV transfer -> decode node -> client, with 16-token prompts and 2-token outputs (so every
request crosses both pools) on the tiny model, and the p50/p99 time each request spends
outside model execution (its total time at the coordinator minus the model steps that
served it).

The served system runs in a child process (``--serve``) so the load generator does not
share the coordinator's interpreter::

    python -m bench.control_plane [--requests 4000] [--concurrency 256] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.served_process import wait_for_address

PROMPT = list(range(10, 26))  # 16 token ids
MAX_TOKENS = 2


def serve(port_file: Path, out: Path, threads: int) -> None:
    import logging

    logging.disable(logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    from disagg.serve import ServedCluster, ServeOptions

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    cluster = ServedCluster(
        ServeOptions(port=0, num_blocks=4096, threads_per_node=threads, max_num_seqs=512)
    ).start()
    port_file.write_text(cluster.client_address)
    while not stop:
        time.sleep(0.05)
    log = list(cluster.coordinator.finished_log)
    cluster.stop(drain_timeout=5)
    out.write_text(json.dumps(log))


async def load(address: str, requests: int, concurrency: int, clients: int) -> tuple[float, int]:
    from disagg.client import AsyncClient

    done = 0
    next_index = 0

    async def worker(client: AsyncClient, cid: str) -> None:
        nonlocal done, next_index
        while next_index < requests:
            next_index += 1
            c = await client.generate(
                PROMPT, client_id=cid, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
            )
            assert len(c.token_ids) == MAX_TOKENS
            done += 1

    async with AsyncClient(address, timeout=300) as client:
        # warm-up
        await asyncio.gather(*(worker(client, "warmup") for _ in range(8)))
        done, next_index = 0, 0
        start = time.perf_counter()
        per_client = max(1, concurrency // clients)
        await asyncio.gather(
            *(worker(client, f"c{k}") for k in range(clients) for _ in range(per_client))
        )
        return time.perf_counter() - start, done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--clients", type=int, default=4, help="client ids sharing the load")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--serve", nargs=2, metavar=("PORT_FILE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]), args.threads)
        return
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="disagg-bench-"))
    port_file, out = tmp / "address", tmp / "log.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.control_plane", "--threads", str(args.threads),
         "--serve", str(port_file), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )  # fmt: skip
    try:
        address = wait_for_address(server, port_file)
        seconds, done = asyncio.run(load(address, args.requests, args.concurrency, args.clients))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    log = json.loads(out.read_text())
    measured = [(total, model) for cid, total, model in log if cid != "warmup"]
    outside = sorted(max(0.0, total - model) for total, model in measured)
    totals = sorted(total for total, _ in measured)

    def pct(xs: list[float], q: int) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]

    print(
        f"control plane, tiny model, 16-token prompts, {MAX_TOKENS}-token outputs, "
        f"{args.concurrency} in flight over {args.clients} client ids, 1 prefill + 1 decode node"
    )
    print(f"  requests/s           {done / seconds:10.0f}   ({done} requests in {seconds:.2f} s)")
    print(f"  latency p50 / p99    {pct(totals, 50) * 1e3:8.1f} / {pct(totals, 99) * 1e3:.1f} ms")
    print(
        f"  outside model p50/p99 {pct(outside, 50) * 1e3:7.1f} / {pct(outside, 99) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()

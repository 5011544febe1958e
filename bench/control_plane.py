"""Control-plane throughput: requests/s through client -> coordinator -> prefill node ->
KV transfer -> decode node -> client, with 16-token prompts and 2-token outputs (so every
request crosses both pools) on the tiny model, and the p50/p99 time each request spends
outside model execution (its total time at the coordinator minus the model steps that
served it). It also splits the CPU each request costs by process (client, coordinator,
each node) and says how much of a node's CPU went into model steps, which bounds the
request rate any control plane could reach on these cores.

The served system runs in a child process (``--serve``) so the load generator does not
share the coordinator's interpreter::

    python -m bench.control_plane [--requests 4000] [--concurrency 256] [--clients 4]

``--stream --max-tokens 256`` streams longer outputs instead: the coordinator's CPU per
streamed token is then the figure that matters (it forwards every token to its client).
``--profile FILE`` records the coordinator's process with py-spy (``pip install py-spy``)
while the load runs and writes a flame graph.
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

from bench.served_process import process_tree_cpu, wait_for_address

PROMPT = list(range(10, 26))  # 16 token ids
# Requests of the warm-up, 8 at a time (it once ran the whole --requests count: minutes
# of near-idle load before the measured run at a large --requests).
WARMUP_REQUESTS = 64


def serve(port_file: Path, out: Path, threads: int, sim: dict | None = None) -> None:
    """The served system; on SIGUSR1 it appends each node's model seconds so far to
    ``out``.snapshots (one JSON line), on SIGTERM it writes the finished log to ``out``."""
    import logging

    logging.disable(logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    from disagg.serve import ServedCluster, ServeOptions

    stop = snapshot = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    def on_snapshot(*_: object) -> None:
        nonlocal snapshot
        snapshot = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_snapshot)
    options = dict(port=0, num_blocks=4096, threads_per_node=threads, max_num_seqs=512)
    options.update(sim or {})
    cluster = ServedCluster(ServeOptions(**options)).start()
    port_file.write_text(cluster.client_address)
    while not stop:
        time.sleep(0.01)
        if snapshot:
            snapshot = False
            model = {n.node_id: n.model_s for n in list(cluster.coordinator.nodes.values())}
            # (a coordinator from before message counts: compared side by side, none)
            model["messages"] = dict(getattr(cluster.coordinator, "message_counts", {}))
            with open(f"{out}.snapshots", "a") as f:
                f.write(json.dumps(model) + "\n")
    log = list(cluster.coordinator.finished_log)
    cluster.stop(drain_timeout=5)
    out.write_text(json.dumps(log))


def model_alone(batch: int, threads: int, repeats: int = 10) -> float:
    """Seconds of one core the model needs per request of this workload, measured in this
    process with nothing else running: a prefill batch of ``batch`` 16-token prompts plus
    one decode step of ``batch`` sequences (the second output token), divided by ``batch``."""
    import torch

    from disagg import SamplingParams
    from disagg.engine.config import EngineConfig
    from disagg.engine.sequence import Sequence
    from disagg.engine.worker import ModelWorker

    torch.set_num_threads(threads)
    worker = ModelWorker(EngineConfig(model="tiny", num_blocks=4 * batch))
    params = SamplingParams(max_tokens=2)
    seqs = [Sequence(i, list(PROMPT), params, 0.0, block_table=[i]) for i in range(batch)]

    def timed(step, seqs) -> float:
        step(seqs)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step(seqs)
        return (time.perf_counter() - start) / repeats

    prefill = timed(worker.runner.prefill, seqs)
    for s in seqs:
        s.output_token_ids.append(PROMPT[0])
        s.block_table.append(batch + s.seq_id)
    decode = timed(worker.runner.decode, seqs)
    return (prefill + decode) / batch


class Usage:
    """CPU seconds by process and model seconds by node, between two ``take`` calls."""

    def __init__(self, server: subprocess.Popen, snapshots: Path) -> None:
        self.server, self.snapshots = server, snapshots
        self.cpu: list[dict[str, float]] = []
        self.model: list[dict[str, float]] = []

    def take(self) -> None:
        lines = len(self.snapshots.read_text().splitlines()) if self.snapshots.exists() else 0
        self.server.send_signal(signal.SIGUSR1)
        self.cpu.append({"client": time.process_time(), **process_tree_cpu(self.server.pid)})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.snapshots.exists():
                taken = self.snapshots.read_text().splitlines()
                if len(taken) > lines:
                    self.model.append(json.loads(taken[-1]))
                    return
            time.sleep(0.01)
        sys.exit("the served system did not answer a usage snapshot")

    def delta(self, table: list[dict]) -> dict:
        first, last = table[0], table[-1]
        return {
            k: self.delta([first[k], last[k]])
            if isinstance(last[k], dict)
            else last[k] - first.get(k, 0.0)
            for k in last
        }


async def load(
    address: str,
    requests: int,
    concurrency: int,
    clients: int,
    usage: Usage,
    *,
    max_tokens: int,
    stream: bool,
) -> tuple[float, int]:
    from disagg.client import AsyncClient

    done = 0
    next_index = 0
    limit = min(requests, WARMUP_REQUESTS)

    async def worker(client: AsyncClient, cid: str) -> None:
        nonlocal done, next_index
        while next_index < limit:
            next_index += 1
            kw = dict(client_id=cid, max_tokens=max_tokens, temperature=0, ignore_eos=True)
            if stream:
                got = 0
                async for chunk in client.stream(PROMPT, **kw):
                    got += len(chunk.token_ids)
                assert got == max_tokens, got
            else:
                c = await client.generate(PROMPT, **kw)
                assert len(c.token_ids) == max_tokens
            done += 1

    async with AsyncClient(address, timeout=300) as client:
        await asyncio.gather(*(worker(client, "warmup") for _ in range(8)))
        done, next_index, limit = 0, 0, requests
        usage.take()
        start = time.perf_counter()
        per_client = max(1, concurrency // clients)
        await asyncio.gather(
            *(worker(client, f"c{k}") for k in range(clients) for _ in range(per_client))
        )
        seconds = time.perf_counter() - start
        usage.take()
        return seconds, done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--clients", type=int, default=4, help="client ids sharing the load")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--max-tokens", type=int, default=2, help="output tokens per request")
    p.add_argument("--stream", action="store_true", help="stream each request's tokens")
    p.add_argument(
        "--profile", metavar="FILE",
        help="py-spy profile of the coordinator's process (samples holding the GIL: Python's "
        "own CPU): a flame graph (.svg) or folded stacks",
    )  # fmt: skip
    p.add_argument(
        "--simulated", metavar="PROFILE",
        help="simulated nodes (disagg.simulated) with this latency profile instead of the model",
    )  # fmt: skip
    p.add_argument("--prefill", type=int, default=1, help="prefill nodes (--simulated)")
    p.add_argument("--decode", type=int, default=1, help="decode nodes (--simulated)")
    p.add_argument("--max-num-seqs", type=int, default=512, help="decode batch cap per node")
    p.add_argument("--serve", nargs=2, metavar=("PORT_FILE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sim = None
    if args.simulated:
        sim = dict(
            simulated=True, latency_profile=args.simulated, prefill=args.prefill,
            decode=args.decode, max_num_seqs=args.max_num_seqs,
        )  # fmt: skip
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]), args.threads, sim)
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
         *(["--simulated", args.simulated] if args.simulated else []),
         "--prefill", str(args.prefill), "--decode", str(args.decode),
         "--max-num-seqs", str(args.max_num_seqs),
         "--serve", str(port_file), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )  # fmt: skip
    try:
        address = wait_for_address(server, port_file)
        usage = Usage(server, Path(f"{out}.snapshots"))
        spy = None
        if args.profile:
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--rate", "200",
                 "--output", args.profile, "--nonblocking", "--gil",
                 "--format", "flamegraph" if args.profile.endswith(".svg") else "raw"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            seconds, done = asyncio.run(
                load(
                    address, args.requests, args.concurrency, args.clients, usage,
                    max_tokens=args.max_tokens, stream=args.stream,
                )
            )  # fmt: skip
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    log = json.loads(out.read_text())
    measured = [(total, model) for cid, total, model in log if cid != "warmup"]
    outside = sorted(max(0.0, total - model) for total, model in measured)
    totals = sorted(total for total, _ in measured)

    def pct(xs: list[float], q: int) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]

    nodes = (
        f"{args.prefill} prefill + {args.decode} decode simulated nodes ({args.simulated})"
        if args.simulated
        else "1 prefill + 1 decode node, tiny model"
    )
    print(
        f"control plane, 16-token prompts, {args.max_tokens}-token outputs"
        f"{' streamed' if args.stream else ''}, {args.concurrency} in flight over "
        f"{args.clients} client ids, {nodes}"
    )
    print(f"  requests/s           {done / seconds:10.0f}   ({done} requests in {seconds:.2f} s)")
    print(f"  latency p50 / p99    {pct(totals, 50) * 1e3:8.1f} / {pct(totals, 99) * 1e3:.1f} ms")
    print(
        f"  outside model p50/p99 {pct(outside, 50) * 1e3:7.1f} / {pct(outside, 99) * 1e3:.1f} ms"
    )
    cpu, model = usage.delta(usage.cpu), usage.delta(usage.model)
    messages = model.pop("messages")
    print(
        "  coordinator messages per request: "
        + ", ".join(f"{k} {v / done:.2f}" for k, v in messages.items())
    )
    tokens = done * args.max_tokens
    print(f"  output tokens/s      {tokens / seconds:10.0f}")
    print(f"  CPU per request and per output token, by process ({os.cpu_count()} cores):")
    for name, seconds_cpu in cpu.items():
        role = "coordinator" if name == "server" else name
        line = (
            f"    {role:<14} {seconds_cpu / done * 1e3:6.3f} ms   "
            f"{seconds_cpu / tokens * 1e6:7.1f} us/token"
        )
        if name in model:
            line += f"   (model steps {model[name] / done * 1e3:6.3f} ms)"
        print(line)
    total_cpu, total_model = sum(cpu.values()), sum(model.values())
    print(
        f"    {'all':<14} {total_cpu / done * 1e3:6.3f} ms   (model steps "
        f"{total_model / done * 1e3:6.3f} ms)"
    )
    if args.max_tokens != 2 or args.simulated:
        return  # the model-alone bound below is for the real model and 2-token outputs
    batch = args.concurrency // 2
    alone = model_alone(batch, args.threads)
    cores = os.cpu_count() or 1
    print(
        f"  model alone (this process, {args.threads} thread, prefill of {batch} prompts + one "
        f"decode step of {batch}): {alone * 1e3:.3f} ms per request"
        f" -> at most {cores / alone:.0f} req/s on {cores} cores with no control plane at all"
    )


if __name__ == "__main__":
    main()

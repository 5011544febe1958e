"""What the HTTP door costs: the same streamed requests through the OpenAI-compatible
gateway (``disagg/http``) and through the ZeroMQ ``AsyncClient``, on one served system
(tiny model, 1 prefill + 1 decode node, CPU), in alternating rounds of one run.

Per door: client-side TTFT (request sent -> first text) and TPOT ((last - first) /
(tokens - 1)) percentiles, and the CPU each process spent per streamed token — the
coordinator, the gateway, the nodes — so the gateway's CPU is read beside the
coordinator's. ``--placement thread`` runs the gateway inside the serve process (on its
own thread and event loop) instead of a process of its own, to measure that choice::

    python -m bench.http_overhead [--requests 48] [--concurrency 1 16] [--tokens 32]
        [--rounds 2] [--placement process|thread]
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
import threading
import time
from pathlib import Path

from bench.served_process import process_tree_cpu, wait_for_address

PROMPT = list(range(10, 42))  # 32 token ids


def serve(info_file: Path, placement: str) -> None:
    """The served system with its gateway; writes {"zmq", "http"} to ``info_file``."""
    import logging

    import uvloop

    logging.disable(logging.WARNING)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from disagg.serve import ServedCluster, ServeOptions

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    in_process = placement == "thread"
    cluster = ServedCluster(
        ServeOptions(
            port=0, num_blocks=2048, threads_per_node=1, http_port=None if in_process else 0
        )
    ).start()
    if in_process:
        url = _gateway_thread(cluster.client_address, str(cluster.model_dir))
    else:
        url = cluster.gateway.url
    info_file.write_text(json.dumps({"zmq": cluster.client_address, "http": url}))
    stop.wait()
    cluster.stop(drain_timeout=5)


def _gateway_thread(coordinator: str, model: str) -> str:
    import socket

    import uvicorn

    from disagg.http.app import GatewaySettings, create_app

    sock = socket.create_server(("127.0.0.1", 0))
    app = create_app(GatewaySettings(coordinator=coordinator, model=model))
    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning",
                            access_log=False)  # fmt: skip
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not main
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def zmq_round(address: str, n: int, concurrency: int, tokens: int) -> list[tuple]:
    from disagg.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:

        async def one(i: int) -> tuple[float, float, int]:
            start = time.perf_counter()
            first = last = None
            count = 0
            async for chunk in client.stream(
                PROMPT, client_id=f"c{i % 4}", max_tokens=tokens, temperature=0, ignore_eos=True
            ):
                last = time.perf_counter()
                first = first or last
                count += len(chunk.token_ids)
            return first - start, last - first, count

        return await _closed_loop(one, n, concurrency)


async def http_round(url: str, n: int, concurrency: int, tokens: int) -> list[tuple]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> tuple[float, float, int]:
            body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "user": f"c{i % 4}",
                    "stream_options": {"include_usage": True}}  # fmt: skip
            start = time.perf_counter()
            first = last = None
            count = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event["choices"] and event["choices"][0]["text"]:
                        last = time.perf_counter()
                        first = first or last
                    if event.get("usage"):
                        count = event["usage"]["completion_tokens"]
            return first - start, last - first, count

        return await _closed_loop(one, n, concurrency)


async def _closed_loop(one, n: int, concurrency: int) -> list[tuple]:
    queue = list(range(n))
    out = []

    async def worker() -> None:
        while queue:
            out.append(await one(queue.pop()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=48, help="per door, per round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per door")
    p.add_argument("--placement", choices=["process", "thread"], default="process")
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), args.serve[1])
        return
    import uvloop

    info = Path(tempfile.mkdtemp(prefix="disagg-http-")) / "info"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.http_overhead", "--serve", str(info), args.placement],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        addresses = json.loads(wait_for_address(server, info))
        print(f"HTTP overhead: tiny model, 1 prefill + 1 decode node, CPU ({os.cpu_count()} cores, "
              f"shared), {len(PROMPT)}-token prompts, {args.tokens} output tokens, streamed; "
              f"gateway placement: {args.placement}")  # fmt: skip
        for conc in args.concurrency:
            results = {"zmq": [], "http": []}
            cpu = {"zmq": {}, "http": {}}
            for _ in range(args.rounds):
                for door in ("zmq", "http"):
                    before = {"client": time.process_time(), **process_tree_cpu(server.pid)}
                    fn = zmq_round if door == "zmq" else http_round
                    res = uvloop.run(fn(addresses[door], args.requests, conc, args.tokens))
                    after = {"client": time.process_time(), **process_tree_cpu(server.pid)}
                    results[door] += res
                    for k in after:
                        cpu[door][k] = cpu[door].get(k, 0.0) + after[k] - before.get(k, 0.0)
            report(conc, results, cpu, args.placement)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def report(conc: int, results: dict, cpu: dict, placement: str) -> None:
    print(f"\nconcurrency {conc}")
    print(f"  {'door':<5} {'n':>4} {'TTFT p50':>9} {'p90':>7} {'TPOT p50':>9} {'p90':>7}   "
          "CPU µs per streamed token: coordinator  gateway  prefill  decode  load-client")  # fmt: skip
    ttft50 = {}
    per_token: dict[str, dict[str, float]] = {}
    for door, res in results.items():
        ttft = [r[0] for r in res]
        tpot = [r[1] / max(1, r[2] - 1) for r in res]
        tokens = sum(r[2] for r in res)
        ttft50[door] = pct(ttft, 50)
        c = cpu[door]
        per = {k: v / tokens * 1e6 for k, v in c.items()}
        per_token[door] = per
        print(
            f"  {door:<5} {len(res):>4} {pct(ttft, 50) * 1e3:>7.2f}ms {pct(ttft, 90) * 1e3:>5.2f}ms "
            f"{pct(tpot, 50) * 1e3:>7.2f}ms {pct(tpot, 90) * 1e3:>5.2f}ms   "
            f"{per.get('server', 0):>37.0f} {per.get('disagg.http', 0):>8.0f} "
            f"{per.get('prefill-0', 0):>8.0f} {per.get('decode-0', 0):>7.0f} {per['client']:>12.0f}"
        )
    z, h = per_token["zmq"], per_token["http"]
    gateway = h.get("disagg.http", 0.0)
    if placement == "thread":  # the gateway's CPU is inside the serve process's
        gateway = h.get("server", 0.0) - z.get("server", 0.0)
    system_z = z.get("server", 0) + z.get("prefill-0", 0) + z.get("decode-0", 0)
    print(
        f"  HTTP adds {(ttft50['http'] - ttft50['zmq']) * 1e3:+.2f} ms to p50 TTFT; the gateway "
        f"spends {gateway:.0f} µs CPU per streamed token = {gateway / z.get('server', 1):.0%} of "
        f"the coordinator's ({z.get('server', 0):.0f} µs, ZeroMQ door) and "
        f"{gateway / system_z:.0%} of the served system's (coordinator + nodes, {system_z:.0f} µs)"
    )


if __name__ == "__main__":
    main()

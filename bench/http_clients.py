"""A standard benchmark client against the HTTP front end: NVIDIA's AIPerf drives
``/v1/completions`` (streamed) at rising Poisson request rates, and at each rate our own
load generator — ``bench.served_load``'s, over the ZeroMQ client — sends the same
requests (same lengths, same rate) to the same served system (tiny model, 1 prefill + 1
decode node, CPU), once through the gateway (httpx) and once through the ZeroMQ client.
Reported side by side: TTFT, ITL/TPOT, E2E latency, goodput (requests/s meeting both
SLOs), the client's own CPU seconds, and our coordinator's TTFT for the ZeroMQ runs.

AIPerf runs from a virtualenv of its own (it pins its own dependencies), with the served
model's local tokenizer directory; nothing is downloaded::

    python -m venv /work/aiperf-venv && /work/aiperf-venv/bin/pip install aiperf
    python -m bench.http_clients [--rates 4 8 16 32] [--requests 60] [--aiperf PATH]

AIPerf's offline switch (``HF_HUB_OFFLINE=1``) makes it look the path up as a hub repo
id and fail (aiperf 0.13.0: ``HFValidationError: Repo id must be in the form
'repo_name'``); a local directory needs no switch: it is loaded from disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.served_process import wait_for_address

DEFAULT_AIPERF = "/work/aiperf-venv/bin/aiperf"


def run_aiperf(aiperf: str, url: str, tokenizer: str, rate: float, args, out: Path) -> dict:
    cmd = [
        aiperf, "profile", "--model", "tiny", "--tokenizer", tokenizer, "--url", url,
        "--endpoint-type", "completions", "--streaming",
        "--synthetic-input-tokens-mean", str(args.isl), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(args.osl), "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--use-server-token-count",
        "--request-rate", str(rate), "--arrival-pattern", "poisson",
        "--request-count", str(args.requests), "--random-seed", "1",
        "--goodput", f"time_to_first_token:{args.ttft_slo * 1e3:g} "
                     f"inter_token_latency:{args.tpot_slo * 1e3:g}",
        "--ui-type", "none", "--artifact-dir", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONPATH")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # aiperf and every process it ran
    result = out / "profile_export_aiperf.json"
    if done.returncode != 0 or not result.exists():
        sys.exit(f"aiperf failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-3000:]}")
    d = json.loads(result.read_text())
    return {
        "n": d["request_count"]["avg"],
        "ttft": (d["time_to_first_token"]["p50"], d["time_to_first_token"]["p90"]),
        "tpot": (d["inter_token_latency"]["p50"], d["inter_token_latency"]["p90"]),
        "e2e": (d["request_latency"]["p50"], d["request_latency"]["p90"]),
        "goodput": d.get("goodput", {}).get("avg", 0.0),
        "throughput": d["request_throughput"]["avg"],
        "client_cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    }


async def run_ours(addresses: dict, door: str, rate: float, args, seed: int) -> dict:
    """bench.served_load's open-loop Poisson generator, streamed, with AIPerf's lengths,
    through the ZeroMQ client or (``door == "http"``) through the gateway with httpx."""
    import httpx

    from disagg.client import AsyncClient

    rng = random.Random(seed)
    rows: list[tuple[float, float, float, float | None]] = []  # ttft, tpot, e2e, coord ttft

    async def one_zmq(prompt: list[int]) -> None:
        start = time.perf_counter()
        first = None
        stream = client.stream(prompt, client_id="bench", max_tokens=args.osl, temperature=0,
                               ignore_eos=True)  # fmt: skip
        async for _ in stream:
            first = first or time.perf_counter()
        end = time.perf_counter()
        done = stream.completion
        n = len(done.token_ids)
        rows.append((first - start, (end - first) / max(1, n - 1), end - start, done.timings.ttft))

    async def one_http(prompt: list[int]) -> None:
        body = {"prompt": prompt, "max_tokens": args.osl, "temperature": 0, "stream": True,
                "ignore_eos": True, "user": "bench"}  # fmt: skip
        start = time.perf_counter()
        first = None
        async with web.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        rows.append((first - start, (end - first) / (args.osl - 1), end - start, None))

    one = one_zmq if door == "zmq" else one_http
    async with (
        AsyncClient(addresses["zmq"], timeout=600) as client,
        httpx.AsyncClient(
            base_url=addresses["http"], timeout=600, limits=httpx.Limits(max_connections=None)
        ) as web,  # fmt: skip
    ):
        cpu0 = time.process_time()
        tasks, t, start = [], 0.0, time.monotonic()
        for _ in range(args.requests):
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            prompt = [rng.randrange(10, 1000) for _ in range(args.isl)]
            tasks.append(asyncio.create_task(one(prompt)))
        await asyncio.gather(*tasks)
        duration = time.monotonic() - start
        cpu = time.process_time() - cpu0
    met = sum(r[0] <= args.ttft_slo and r[1] <= args.tpot_slo for r in rows)

    def q(i: int) -> tuple[float, float]:
        xs = [r[i] * 1e3 for r in rows]
        return pct(xs, 50), pct(xs, 90)

    coord = q(3) if door == "zmq" else None
    return {"n": len(rows), "ttft": q(0), "tpot": q(1), "e2e": q(2), "coord_ttft": coord,
            "goodput": met / duration, "throughput": len(rows) / duration,
            "client_cpu": cpu}  # fmt: skip


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--requests", type=int, default=60, help="per rate and client")
    p.add_argument("--isl", type=int, default=64, help="prompt tokens")
    p.add_argument("--osl", type=int, default=32, help="output tokens")
    p.add_argument("--ttft-slo", type=float, default=0.25, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.05, help="seconds")
    p.add_argument("--aiperf", default=DEFAULT_AIPERF)
    args = p.parse_args()
    if not Path(args.aiperf).exists():
        sys.exit(
            f"no aiperf at {args.aiperf}: install it into a virtualenv of its own (see --help)"
        )
    import uvloop

    from disagg.engine.tiny_model import tiny_model_path

    tmp = Path(tempfile.mkdtemp(prefix="disagg-aiperf-"))
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.http_overhead", "--serve", str(tmp / "info"), "process"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        addresses = json.loads(wait_for_address(server, tmp / "info"))
        print(f"AIPerf (HTTP) vs our load generator (ZeroMQ): tiny model, 1 prefill + 1 decode "
              f"node, CPU ({os.cpu_count()} cores, shared); {args.isl}-token prompts, "
              f"{args.osl} output tokens, Poisson arrivals, {args.requests} requests per rate; "
              f"goodput SLO TTFT <= {args.ttft_slo * 1e3:.0f} ms and TPOT <= "
              f"{args.tpot_slo * 1e3:.0f} ms; ms are p50/p90")  # fmt: skip
        print(f"  {'req/s':>5} {'client':<10} {'n':>3} {'TTFT':>11} {'ITL/TPOT':>11} {'E2E':>11} "
              f"{'goodput':>8} {'req/s':>6} {'client CPU':>10} {'coord TTFT':>11}")  # fmt: skip
        for k, rate in enumerate(args.rates):
            a = run_aiperf(args.aiperf, addresses["http"], str(tiny_model_path()), rate, args,
                           tmp / f"aiperf-{rate:g}")  # fmt: skip
            z = uvloop.run(run_ours(addresses, "zmq", rate, args, seed=k))
            h = uvloop.run(run_ours(addresses, "http", rate, args, seed=k))
            for name, r in (("aiperf", a), ("ours/http", h), ("ours/zmq", z)):
                coord = r.get("coord_ttft")
                print(
                    f"  {rate:>5g} {name:<10} {r['n']:>3.0f} {fmt(r['ttft'])} {fmt(r['tpot'])} "
                    f"{fmt(r['e2e'])} {r['goodput']:>8.2f} {r['throughput']:>6.2f} "
                    f"{r['client_cpu']:>9.1f}s {fmt(coord) if coord else '':>11}"
                )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:>5.1f}/{pair[1]:<5.1f}"


if __name__ == "__main__":
    main()

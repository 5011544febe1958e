"""Served load: TTFT/TPOT percentiles and SLO attainment (both met) of the served system
(1 prefill + 1 decode node, tiny model, CPU) at increasing Poisson request rates, and a
plot (``docs/figures/served_load.png``)::

    python -m bench.served_load [--rates 10 20 40 80 120] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.served_process import wait_for_address

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "served_load.png"


async def run_rate(
    address: str, rate: float, seconds: float, seed: int
) -> list[tuple[float, float]]:
    from disagg.client import AsyncClient

    rng = random.Random(seed)
    results: list[tuple[float, float]] = []

    async def one(prompt_len: int, out_len: int) -> None:
        prompt = [rng.randrange(10, 1000) for _ in range(prompt_len)]
        done = await client.generate(
            prompt, client_id=f"c{prompt_len % 4}", max_tokens=out_len, temperature=0,
            ignore_eos=True,
        )  # fmt: skip
        results.append((done.timings.ttft or 0.0, done.timings.tpot or 0.0))

    async with AsyncClient(address, timeout=600) as client:
        tasks = []
        start = time.monotonic()
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t > seconds:
                break
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            tasks.append(asyncio.create_task(one(rng.randint(16, 256), rng.randint(16, 64))))
        await asyncio.gather(*tasks)
    return results


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40, 60, 80])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--ttft-slo", type=float, default=0.25)
    p.add_argument("--tpot-slo", type=float, default=0.05)
    p.add_argument("--plot", type=Path, default=FIGURE)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="disagg-load-"))
    port_file, out = tmp / "address", tmp / "log.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.control_plane", "--serve", str(port_file), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rows = []
    try:
        address = wait_for_address(server, port_file)
        print(
            f"served load: tiny model, 1 prefill + 1 decode node, prompts 16-256, outputs "
            f"16-64 tokens, SLO TTFT <= {args.ttft_slo * 1e3:.0f} ms and TPOT <= "
            f"{args.tpot_slo * 1e3:.0f} ms"
        )
        print(f"  {'req/s':>6} {'n':>5} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
              f"{'TPOT p50':>9} {'p90':>7} {'p99':>7} {'SLO met':>8}")  # fmt: skip
        for k, rate in enumerate(args.rates):
            res = asyncio.run(run_rate(address, rate, args.seconds, seed=k))
            ttft = [r[0] for r in res]
            tpot = [r[1] for r in res]
            met = sum(a <= args.ttft_slo and b <= args.tpot_slo for a, b in res) / len(res)
            rows.append((rate, ttft, tpot, met))
            print(
                f"  {rate:>6.0f} {len(res):>5} {pct(ttft, 50) * 1e3:>7.0f}ms "
                f"{pct(ttft, 90) * 1e3:>5.0f}ms {pct(ttft, 99) * 1e3:>5.0f}ms "
                f"{pct(tpot, 50) * 1e3:>7.1f}ms {pct(tpot, 90) * 1e3:>5.1f}ms "
                f"{pct(tpot, 99) * 1e3:>5.1f}ms {met:>8.0%}"
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rates = [r[0] for r in rows]
    for q, style in ((50, "-o"), (90, "--s"), (99, ":^")):
        axes[0].plot(rates, [pct(r[1], q) * 1e3 for r in rows], style, label=f"p{q}")
        axes[1].plot(rates, [pct(r[2], q) * 1e3 for r in rows], style, label=f"p{q}")
    axes[0].axhline(args.ttft_slo * 1e3, color="grey", lw=0.8)
    axes[1].axhline(args.tpot_slo * 1e3, color="grey", lw=0.8)
    axes[2].plot(rates, [r[3] * 100 for r in rows], "-o")
    for ax, title in zip(axes, ("TTFT (ms)", "TPOT (ms)", "SLO attainment (%)"), strict=True):
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].set_ylim(0, 105)
    fig.suptitle("disagg served on CPU: tiny model, 1 prefill + 1 decode node")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

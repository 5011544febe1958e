"""The README's main job: the served system on the tiny model, one heavy client and two
light ones, first under FCFS and then under two-stage VTC, with a table of what each
client got (service, TTFT, TPOT, SLO attainment).

The decode node is given few slots (``--decode-slots``) so that, on a laptop, demand
exceeds what the cluster serves: fairness only matters under contention.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from disagg.client import AsyncClient
from disagg.serve import ServedCluster, ServeOptions

W_IN, W_OUT = 1, 2  # the default service cost h = n_in + 2 n_out


@dataclass(frozen=True)
class ClientSpec:
    name: str
    in_flight: int
    prompt_words: int
    max_tokens: int


CLIENTS = (
    ClientSpec("heavy", in_flight=8, prompt_words=48, max_tokens=48),
    ClientSpec("light-1", in_flight=1, prompt_words=12, max_tokens=24),
    ClientSpec("light-2", in_flight=1, prompt_words=12, max_tokens=24),
)


@dataclass
class ClientResult:
    service: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    met: int = 0
    requests: int = 0


async def drive(
    address: str, duration: float, ttft_slo: float, tpot_slo: float
) -> dict[str, ClientResult]:
    results = {c.name: ClientResult() for c in CLIENTS}

    async def worker(client: AsyncClient, spec: ClientSpec, stop_at: float, k: int) -> None:
        prompt = " ".join(f"word{(k * 7 + i) % 50}" for i in range(spec.prompt_words))
        while time.monotonic() < stop_at:
            done = await client.generate(
                prompt, client_id=spec.name, max_tokens=spec.max_tokens, ignore_eos=True, seed=k
            )
            if time.monotonic() > stop_at:
                break
            r = results[spec.name]
            t = done.timings
            r.requests += 1
            r.service += W_IN * len(done.prompt_token_ids) + W_OUT * len(done.token_ids)
            r.ttft.append(t.ttft or 0.0)
            if t.tpot is not None:
                r.tpot.append(t.tpot)
            r.met += (t.ttft or 0.0) <= ttft_slo and (t.tpot or 0.0) <= tpot_slo

    async with AsyncClient(address, timeout=300) as client:
        stop_at = time.monotonic() + duration
        await asyncio.gather(
            *(worker(client, spec, stop_at, k) for spec in CLIENTS for k in range(spec.in_flight))
        )
    return results


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def print_table(policy: str, results: dict[str, ClientResult], duration: float) -> None:
    total = sum(r.service for r in results.values()) or 1
    print(f"\n{policy}")
    print(
        f"  {'client':<9}{'in flight':>10}{'requests':>10}{'service/s':>11}{'share':>8}"
        f"{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}{'SLO met':>9}"
    )
    for spec in CLIENTS:
        r = results[spec.name]
        attain = r.met / r.requests if r.requests else float("nan")
        print(
            f"  {spec.name:<9}{spec.in_flight:>10}{r.requests:>10}{r.service / duration:>11.0f}"
            f"{r.service / total:>8.1%}{_p(r.ttft, 50) * 1e3:>8.0f}ms{_p(r.ttft, 90) * 1e3:>8.0f}ms"
            f"{_p(r.tpot, 50) * 1e3:>8.1f}ms{attain:>9.0%}"
        )


async def unloaded_latency(address: str) -> tuple[float, float]:
    """Median TTFT and TPOT of a light request alone: the SLOs are set from these, so the
    demo means the same on a slow laptop and a fast server."""
    spec = CLIENTS[1]
    prompt = " ".join(f"word{i}" for i in range(spec.prompt_words))
    ttfts, tpots = [], []
    async with AsyncClient(address, timeout=120) as client:
        for k in range(5):
            done = await client.generate(
                prompt, client_id="calibration", max_tokens=spec.max_tokens, ignore_eos=True, seed=k
            )
            ttfts.append(done.timings.ttft or 0.0)
            tpots.append(done.timings.tpot or 0.0)
    return statistics.median(ttfts), statistics.median(tpots)


def run_showcase(
    *,
    model: str = "tiny",
    duration: float = 15.0,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    decode_slots: int = 2,
    policies: tuple[str, ...] = ("fcfs", "two-stage-vtc"),
) -> int:
    """SLOs default to 5x the unloaded TTFT (at least 50 ms) and 6x the unloaded TPOT."""
    if ttft_slo is None or tpot_slo is None:
        options = ServeOptions(model=model, port=0, max_num_seqs=decode_slots, num_blocks=512)
        with ServedCluster(options) as cluster:
            ttft0, tpot0 = asyncio.run(unloaded_latency(cluster.client_address))
        ttft_slo = ttft_slo or round(max(0.05, 5 * ttft0), 3)
        tpot_slo = tpot_slo or round(6 * tpot0, 4)
        print(
            f"disagg: unloaded light request: TTFT {ttft0 * 1e3:.1f} ms, TPOT {tpot0 * 1e3:.1f} ms"
        )
    print(
        f"disagg: 1 prefill + 1 decode node serving {model!r}; clients: "
        + ", ".join(f"{c.name} ({c.in_flight} in flight)" for c in CLIENTS)
        + f"; {duration:.0f} s per policy; SLO: TTFT <= {ttft_slo * 1e3:.0f} ms and "
        f"TPOT <= {tpot_slo * 1e3:.1f} ms; service counts prompt tokens once and output "
        "tokens twice"
    )
    for policy in policies:
        options = ServeOptions(
            model=model, port=0, policy=policy, max_num_seqs=decode_slots, num_blocks=512
        )
        with ServedCluster(options) as cluster:
            results = asyncio.run(drive(cluster.client_address, duration, ttft_slo, tpot_slo))
        print_table(policy, results, duration)
    print(
        "\nUnder FCFS the heavy client's queue delays everyone behind it. Under two-stage VTC "
        "a backlogged client with less service goes first, so the light clients (their share "
        "limited only by their own demand) get more service and faster tokens."
    )
    return 0

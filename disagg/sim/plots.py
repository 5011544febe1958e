"""Figures a person reads at a glance: cumulative service per client, service rate over
time, and the TTFT distribution per client."""

from __future__ import annotations

from pathlib import Path

from disagg.sim.metrics import service_timeline
from disagg.sim.simulator import SimResult

RATE_WINDOW_S = 60.0


def write_plots(result: SimResult, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{result.policy} on a {result.cluster.kind} cluster"
    times, cumulative = service_timeline(result, step=1.0)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for client, series in cumulative.items():
        ax.plot(times, series, label=f"{client} (w={result.weights.get(client, 1.0):g})")
    ax.set(
        xlabel="time (s)",
        ylabel="cumulative weighted service (tokens)",
        title=f"Service received — {title}",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "cumulative_service.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = int(RATE_WINDOW_S)
    for client, series in cumulative.items():
        rate = [
            (series[i] - (series[i - w] if i >= w else 0.0)) / min(i + 1, w)
            for i in range(len(series))
        ]
        ax.plot(times, rate, label=client)
    ax.set(
        xlabel="time (s)",
        ylabel=f"service rate over the last {w} s (tokens/s)",
        title=f"Service rate — {title}",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "service_rate.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for client in result.client_ids:
        ttfts = sorted(
            r.ttft for r in result.requests if r.client_id == client and r.ttft is not None
        )
        if ttfts:
            ax.step(
                ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=client
            )
    ax.set(
        xlabel="time to first token (s)", ylabel="share of requests", title=f"TTFT CDF — {title}"
    )
    ax.set_xscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "ttft_cdf.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

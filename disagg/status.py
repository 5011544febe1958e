"""``disagg status``: a served system's state as its metrics endpoint reports it — nodes,
queues, and per client: requests, service, counter and SLO attainment over the window."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from disagg.errors import ServerUnavailable


def scrape(url: str, timeout: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from a Prometheus text endpoint."""
    try:
        text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnavailable(
            f"no metrics at {url} ({e}); start the server with --metrics-port",
            address=url,
            timeout=timeout,
        ) from None
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append((s.labels, s.value))
    return samples


def render_status(samples: dict[str, list[tuple[dict[str, str], float]]]) -> str:
    out = ["nodes"]
    for labels, value in sorted(samples.get("disagg_node_up", []), key=lambda x: x[0]["node_id"]):
        state = "up" if value else "DOWN"
        out.append(f"  {labels['node_id']:<14}{labels['role']:<9}{state}")
    queues = {lab["pool"]: int(v) for lab, v in samples.get("disagg_queue_depth", [])}
    out.append(
        "queues   " + ", ".join(f"{pool} {n}" for pool, n in sorted(queues.items()))
        if queues
        else "queues   -"
    )
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for lab, v in samples.get("disagg_requests_finished_total", []):
        per[lab["client_id"]]["finished"] += v
    for lab, v in samples.get("disagg_requests_rejected_total", []):
        per[lab["client_id"]]["rejected"] += v
    for lab, v in samples.get("disagg_client_service_total", []):
        per[lab["client_id"]]["service"] += v
    for lab, v in samples.get("disagg_client_counter", []):
        per[lab["client_id"]]["counter"] = v
    for lab, v in samples.get("disagg_slo_attainment", []):
        per[lab["client_id"]]["attainment"] = v
    for lab, v in samples.get("disagg_slo_window_requests", []):
        per[lab["client_id"]]["window"] = v
    out.append("clients")
    out.append(
        f"  {'client':<16}{'finished':>9}{'rejected':>9}{'service':>10}{'counter':>10}"
        f"{'SLO met (window)':>18}"
    )
    for client, m in sorted(per.items()):
        slo = f"{m['attainment']:.0%} of {int(m['window'])}" if "attainment" in m else "-"
        out.append(
            f"  {client:<16}{int(m['finished']):>9}{int(m['rejected']):>9}"
            f"{m['service']:>10.0f}{m.get('counter', 0.0):>10.0f}{slo:>18}"
        )
    return "\n".join(out)


def run_status(url: str) -> int:
    print(render_status(scrape(url)))
    return 0

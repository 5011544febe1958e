"""What ``disagg plan`` prints (a table, or one JSON object) and the deployment file
it writes."""

from __future__ import annotations

from typing import Any

from disagg import deployment as dep
from disagg.errors import ConfigError
from disagg.planner.plan import PlanResult
from disagg.planner.search import Scored
from disagg.planner.space import Deployment, assign_devices


def _layout(d: Deployment, role: str) -> dict[str, int]:
    if d.decode is None:
        return {"tp": d.prefill.tp, "pp": d.prefill.pp, "instances": d.n_prefill}
    config = d.prefill if role == "prefill" else d.decode
    count = d.n_prefill if role == "prefill" else d.n_decode
    return {"tp": config.tp, "pp": config.pp, "instances": count * d.replicas}


def _placement(result: PlanResult, d: Deployment) -> list[dict[str, Any]]:
    return [
        {"role": role, "index": index, "gpus": [{"node": n, "gpu": g} for n, g in gpus]}
        for role, index, gpus in assign_devices(d, result.request.cluster)
    ]


def _scored(s: Scored | None) -> dict[str, Any] | None:
    if s is None:
        return None
    d = s.deployment
    return {
        "description": d.describe(),
        "gpus": d.gpus,
        "per_gpu_goodput": s.per_gpu_goodput,
        "goodput": s.per_gpu_goodput * d.gpus,
        "attainment": s.outcome.attainment,
        "ttft_p90_s": s.outcome.ttft_p90,
        "tpot_p90_s": s.outcome.tpot_p90,
    }


def to_json(result: PlanResult) -> dict[str, Any]:
    req, best = result.request, result.best
    d = best.deployment
    colo = result.colocated
    out: dict[str, Any] = {
        "model": req.model.name,
        "gpu": req.gpu.name,
        "nodes": req.cluster.nodes,
        "gpus_per_node": req.cluster.gpus_per_node,
        "workload": req.workload.name,
        "requests_simulated": len(req.workload),
        "slo": {"ttft_s": req.slo.ttft, "tpot_s": req.slo.tpot, "attainment": req.slo.attainment},
        "policy": req.policy,
        "latency": "fitted profile" if req.profile is not None else "analytic roofline",
        "affinity": result.affinity,
        "affinity_reason": result.affinity_reason,
        "prefill": _layout(d, "prefill"),
        "decode": _layout(d, "decode"),
        "gpus_used": d.gpus,
        "placement": _placement(result, d),
        "per_gpu_goodput": best.per_gpu_goodput,
        "goodput": best.per_gpu_goodput * d.gpus,
        "predicted": _scored(best),
        "colocated": None
        if colo is None
        else {
            **(_scored(colo) or {}),
            "tp": colo.deployment.prefill.tp,
            "pp": colo.deployment.prefill.pp,
            "instances": colo.deployment.n_prefill,
        },
        "colocated_per_gpu_goodput": None if colo is None else colo.per_gpu_goodput,
        "ratio_to_colocated": result.ratio,
        "search_seconds": result.search_seconds,
        "simulations": result.simulations,
        "candidates": result.stats.candidates,
        "candidates_simulated": result.stats.simulated,
        "layouts": [str(c) for c in result.configs],
        "layouts_excluded": {str(c): why for c, why in result.excluded.items()},
    }
    if req.rate is not None and result.at_rate is not None:
        at = result.at_rate
        out["at_rate"] = {
            "rate": req.rate,
            "attainment": at.attainment,
            "ttft_p90_s": at.ttft_p90,
            "tpot_p90_s": at.tpot_p90,
        }
        sized, outcome = result.sized or (d, at)
        out["for_rate"] = {
            "rate": req.rate,
            "description": sized.describe(),
            "prefill": _layout(sized, "prefill"),
            "decode": _layout(sized, "decode"),
            "gpus_used": sized.gpus,
            "placement": _placement(result, sized),
            "attainment": outcome.attainment,
            "ttft_p90_s": outcome.ttft_p90,
            "tpot_p90_s": outcome.tpot_p90,
        }
    return out


def format_table(result: PlanResult) -> str:
    j = to_json(result)
    req = result.request
    lines = [
        f"{j['model']} on {req.cluster.nodes} x {req.cluster.gpus_per_node} {j['gpu']}, "
        f"{j['workload']} ({j['requests_simulated']} requests), TTFT {req.slo.ttft:g} s, "
        f"TPOT {req.slo.tpot:g} s, {req.slo.attainment:.0%} attainment (both SLOs per request)",
        f"latency: {j['latency']}; affinity {j['affinity']} ({j['affinity_reason']})",
        "",
        f"{'':<12} {'tp':>3} {'pp':>3} {'instances':>9} {'GPUs':>5}",
    ]
    for role in ("prefill", "decode"):
        lay = j[role]
        lines.append(
            f"{role:<12} {lay['tp']:>3} {lay['pp']:>3} {lay['instances']:>9} "
            f"{lay['tp'] * lay['pp'] * lay['instances']:>5}"
        )
    lines.append("")
    lines.append("placement (node: GPU -> instance)")
    per_node: dict[int, list[str]] = {}
    for inst in j["placement"]:
        for g in inst["gpus"]:
            per_node.setdefault(g["node"], []).append(
                f"{g['gpu']}:{inst['role'][0]}{inst['index']}"
            )
    for node in sorted(per_node):
        lines.append(f"  node {node}: " + " ".join(per_node[node]))
    p = j["predicted"]
    lines += [
        "",
        f"{'':<14} {'goodput/GPU':>11} {'goodput':>9} {'GPUs':>5} {'attain':>7} "
        f"{'P90 TTFT':>9} {'P90 TPOT':>9}",
        _row("disaggregated", p),
    ]
    if j["colocated"] is not None:
        c = j["colocated"]
        lines.append(_row("colocated", c))
        lines.append(f"  colocated layout: {c['description']}")
    if j["ratio_to_colocated"] is not None:
        lines.append(f"disaggregated / colocated goodput per GPU: {j['ratio_to_colocated']:.2f}x")
    if "at_rate" in j:
        a, f = j["at_rate"], j["for_rate"]
        lines.append(
            f"at {a['rate']:g} req/s: {a['attainment']:.1%} attainment, P90 TTFT "
            f"{_ms(a['ttft_p90_s'])}, P90 TPOT {_ms(a['tpot_p90_s'])}"
        )
        lines.append(
            f"fewest GPUs for {f['rate']:g} req/s: {f['description']} on {f['gpus_used']} "
            f"GPUs: {f['attainment']:.1%} attainment, P90 TTFT {_ms(f['ttft_p90_s'])}, "
            f"P90 TPOT {_ms(f['tpot_p90_s'])}"
        )
    lines.append(
        f"searched {j['candidates']} candidates ({j['candidates_simulated']} simulated whole, "
        f"{j['simulations']} simulations) in {j['search_seconds']:.2f} s"
    )
    return "\n".join(lines)


def _row(name: str, s: dict[str, Any]) -> str:
    return (
        f"{name:<14} {s['per_gpu_goodput']:>11.3f} {s['goodput']:>9.2f} {s['gpus']:>5} "
        f"{s['attainment']:>7.1%} {_ms(s['ttft_p90_s']):>9} {_ms(s['tpot_p90_s']):>9}"
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


LAYOUTS = ("auto", "disaggregated", "colocated")


def chosen_layout(result: PlanResult, layout: str = "auto") -> str:
    """Which deployment ``-o`` writes: ``auto`` takes colocated when its goodput per GPU
    is higher than the best disaggregated one's (the plan's ratio below 1)."""
    if layout not in LAYOUTS:
        raise ConfigError("layout", f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "colocated" and result.colocated is None:
        raise ConfigError("layout", "no colocated layout fits this cluster")
    if layout == "auto":
        ratio = result.ratio
        return "colocated" if ratio is not None and ratio < 1 else "disaggregated"
    return layout


def to_deployment(
    result: PlanResult, model: str, device: str = "cuda", layout: str = "auto"
) -> dep.Deployment:
    """The deployment file for the plan (with a rate: for the fewest GPUs that serve
    it, when disaggregated; a colocated layout is written as the plan scored it).
    ``layout``: see :func:`chosen_layout`. Each instance must sit on one host: the file
    names one host per instance."""
    req, d = result.request, result.best.deployment
    kind = chosen_layout(result, layout)
    j = to_json(result)
    if kind == "colocated":
        assert result.colocated is not None
        d = result.colocated.deployment
        scored = j["colocated"]
    else:
        scored = j["predicted"]
        if result.sized is not None:
            d = result.sized[0]
    nodes = []
    for role, index, gpus in assign_devices(d, req.cluster):
        role = "colocated" if kind == "colocated" else role
        hosts = sorted({n for n, _ in gpus})
        if len(hosts) > 1:
            raise ConfigError(
                "output",
                f"the plan puts {role} instance {index}'s pipeline stages on nodes "
                f"{hosts}; a deployment file places each instance on one host. Plan with "
                f"more GPUs per node, or --affinity high with smaller instances",
            )
        nodes.append(
            dep.NodeRole(
                role=role,
                index=index,
                host="localhost" if req.cluster.nodes == 1 else f"node{hosts[0]}",
                devices=[g for _, g in gpus] if device == "cuda" else [],
            )
        )
    predicted = {
        "layout": kind,
        "per_gpu_goodput": scored["per_gpu_goodput"],
        "goodput": scored["goodput"],
        "attainment": scored["attainment"],
        "ttft_p90_s": scored["ttft_p90_s"],
        "tpot_p90_s": scored["tpot_p90_s"],
        "disaggregated_per_gpu_goodput": j["per_gpu_goodput"],
        "colocated_per_gpu_goodput": j["colocated_per_gpu_goodput"],
        "workload": j["workload"],
        "gpu": j["gpu"],
        "latency": j["latency"],
    }
    if "for_rate" in j and kind == "disaggregated":  # predicted for the GPUs written
        f = j["for_rate"]
        predicted.update(
            rate=f["rate"],
            attainment=f["attainment"],
            ttft_p90_s=f["ttft_p90_s"],
            tpot_p90_s=f["tpot_p90_s"],
        )
    phases: dict[str, dep.PhaseLayout] = (
        {"colocated": dep.PhaseLayout(**_layout(d, "colocated"))}
        if kind == "colocated"
        else {
            "prefill": dep.PhaseLayout(**_layout(d, "prefill")),
            "decode": dep.PhaseLayout(**_layout(d, "decode")),
        }
    )
    return dep.Deployment(
        model=model,
        device=device,
        policy=req.policy,
        slo=dep.SLO(ttft_s=req.slo.ttft, tpot_s=req.slo.tpot, attainment=req.slo.attainment),
        nodes=nodes,
        predicted=predicted,
        **phases,
    )

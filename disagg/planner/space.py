"""The candidate space: per-phase parallel layouts, how they sit on the nodes, and the
deployments built from them.

A *phase config* is (tp, pp) with tp dividing the attention heads (and compatible with
the KV heads), pp dividing the layers, tp inside one node, and enough KV memory for
the workload's longest request. A *deployment* is prefill and decode instance counts
for a pair of configs (disaggregated) or one config's count (colocated).

- High node-affinity (fast links between nodes): any instances that pack onto the
  nodes, each tensor-parallel group inside one node; KV moves over the network.
- Low node-affinity (slow links between nodes): DistServe's segments. Prefill and
  decode use the same pp, and stage i of every instance of a group sits on the group's
  node i, so KV moves over the intra-node link. A group is ``pp`` nodes holding
  ``n_p`` prefill and ``n_d`` decode instances (``n_p·tp_p + n_d·tp_d`` GPUs per node);
  groups are identical and independent, and the deployment is the group replicated on
  every ``pp`` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Affinity = Literal["high", "low"]


@dataclass(frozen=True, order=True)
class PhaseConfig:
    tp: int
    pp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp{self.tp}·pp{self.pp}"


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Deployment:
    """What one simulation runs. Colocated: ``decode`` is None and ``prefill`` is the
    colocated instances' config. ``replicas`` identical copies serve the traffic
    (low affinity: one per group of nodes); the simulation runs one copy."""

    prefill: PhaseConfig
    n_prefill: int
    decode: PhaseConfig | None
    n_decode: int
    affinity: Affinity = "high"
    replicas: int = 1

    @property
    def colocated(self) -> bool:
        return self.decode is None

    @property
    def unit_gpus(self) -> int:
        """GPUs of the simulated copy."""
        gpus = self.n_prefill * self.prefill.gpus
        if self.decode is not None:
            gpus += self.n_decode * self.decode.gpus
        return gpus

    @property
    def gpus(self) -> int:
        return self.replicas * self.unit_gpus

    def describe(self) -> str:
        if self.decode is None:
            return f"colocated {self.n_prefill}x {self.prefill}"
        copies = f"{self.replicas}x [" if self.replicas > 1 else ""
        end = "]" if self.replicas > 1 else ""
        return (
            f"{copies}prefill {self.n_prefill}x {self.prefill} + "
            f"decode {self.n_decode}x {self.decode}{end} ({self.affinity} affinity)"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp(num_heads: int, num_kv_heads: int, limit: int) -> list[int]:
    """tp dividing the heads, with the KV heads split evenly or replicated evenly."""
    return [
        d
        for d in divisors(num_heads)
        if d <= limit and (num_kv_heads % d == 0 or d % num_kv_heads == 0)
    ]


def pack(groups: list[tuple[int, int]], cluster: Cluster) -> list[list[int]] | None:
    """Place tensor-parallel groups ``(size, owner)`` on the nodes, each group inside one
    node: first-fit decreasing. Returns the owners per node (one entry per GPU), or None
    when they do not fit. First-fit decreasing is exact when every size divides the
    next larger one (powers of two, the usual case); otherwise it may refuse a
    packing that exists, never accept one that does not."""
    free = [cluster.gpus_per_node] * cluster.nodes
    placed: list[list[int]] = [[] for _ in range(cluster.nodes)]
    for size, owner in sorted(groups, key=lambda g: -g[0]):
        for node, room in enumerate(free):
            if room >= size:
                free[node] -= size
                placed[node].extend([owner] * size)
                break
        else:
            return None
    return placed


def high_affinity_groups(d: Deployment, *, whole: bool = False) -> list[tuple[int, int]]:
    """Each instance's tp groups, one per pipeline stage (``whole``: one group per
    instance); owner = instance number, prefill instances first."""
    groups: list[tuple[int, int]] = []
    phases = [(d.prefill, d.n_prefill, 0)]
    if d.decode is not None:
        phases.append((d.decode, d.n_decode, d.n_prefill))
    for config, count, first in phases:
        for i in range(count):
            if whole:
                groups.append((config.gpus, first + i))
            else:
                groups += [(config.tp, first + i)] * config.pp
    return groups


def place(d: Deployment, cluster: Cluster) -> list[list[int]] | None:
    """Owners per GPU of every node: whole instances on one node when they can be,
    else pipeline stages on different nodes; None when nothing fits."""
    if max(d.prefill.gpus, d.decode.gpus if d.decode else 0) <= cluster.gpus_per_node:
        placed = pack(high_affinity_groups(d, whole=True), cluster)
        if placed is not None:
            return placed
    return pack(high_affinity_groups(d), cluster)


def disaggregated_deployments(
    prefill: list[PhaseConfig],
    decode: list[PhaseConfig],
    cluster: Cluster,
    affinity: Affinity,
) -> list[Deployment]:
    out: list[Deployment] = []
    total = cluster.gpus
    for cp in prefill:
        for cd in decode:
            if affinity == "low":
                if cp.pp != cd.pp or cp.pp > cluster.nodes:
                    continue
                replicas = cluster.nodes // cp.pp
                m = cluster.gpus_per_node
                for n_p in range(1, m // cp.tp + 1):
                    for n_d in range(1, (m - n_p * cp.tp) // cd.tp + 1):
                        out.append(Deployment(cp, n_p, cd, n_d, "low", replicas))
                continue
            for n_p in range(1, total // cp.gpus + 1):
                room = total - n_p * cp.gpus
                for n_d in range(1, room // cd.gpus + 1):
                    d = Deployment(cp, n_p, cd, n_d, "high")
                    if place(d, cluster) is not None:
                        out.append(d)
    return out


def colocated_deployments(configs: list[PhaseConfig], cluster: Cluster) -> list[Deployment]:
    out = []
    for c in configs:
        for n in range(1, cluster.gpus // c.gpus + 1):
            d = Deployment(c, n, None, 0)
            if place(d, cluster) is not None:
                out.append(d)
    return out


def assign_devices(d: Deployment, cluster: Cluster) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """Every instance of the whole deployment (all replicas) as ``(role, index,
    [(node, gpu), ...])``, its GPUs in stage order."""
    if d.affinity == "low":
        return _assign_low(d, cluster)
    placed = place(d, cluster)
    assert placed is not None, "a deployment in the space always packs"
    gpus: dict[int, list[tuple[int, int]]] = {}
    for node, owners in enumerate(placed):
        for gpu, owner in enumerate(owners):
            gpus.setdefault(owner, []).append((node, gpu))
    out = []
    for owner in sorted(gpus):
        if owner < d.n_prefill:
            out.append(("prefill", owner, gpus[owner]))
        else:
            out.append(("decode", owner - d.n_prefill, gpus[owner]))
    return out


def _assign_low(d: Deployment, cluster: Cluster) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """Group r holds nodes r·pp .. r·pp + pp - 1; each instance's stage s sits on the
    group's node s, at the same GPU indices on every node of the group."""
    assert d.decode is not None
    pp = d.prefill.pp
    out = []
    for r in range(d.replicas):
        nodes = range(r * pp, r * pp + pp)
        gpu = 0
        for role, count, tp in (
            ("prefill", d.n_prefill, d.prefill.tp),
            ("decode", d.n_decode, d.decode.tp),
        ):
            for i in range(count):
                devs = [(node, g) for node in nodes for g in range(gpu, gpu + tp)]
                out.append((role, r * count + i, devs))
                gpu += tp
        assert gpu <= cluster.gpus_per_node
    return out

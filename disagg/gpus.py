"""Which GPUs ``disagg serve`` gives its node processes, and how they share them.

Nodes see their GPUs through ``CUDA_VISIBLE_DEVICES``. When ``disagg serve`` itself runs
under ``CUDA_VISIBLE_DEVICES`` (a scheduler gave it some GPUs), the indices it assigns
are positions in *its* list, so a node's variable is built from the parent's entries
(indices, UUIDs or MIG names alike), never from bare indices.

With fewer GPUs than nodes, nodes share GPUs round robin (prefill nodes come first, so
one GPU holds a prefill and a decode node): pairs on one GPU move KV over CUDA IPC, and
each node takes an equal part of the memory it may use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from disagg.errors import ConfigError

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def parent_devices(environ: Mapping[str, str]) -> list[str] | None:
    """This process's ``CUDA_VISIBLE_DEVICES`` entries, or None when it is not set (every
    GPU visible, index i is physical GPU i)."""
    value = environ.get(VISIBLE_ENV)
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def node_visible_devices(indices: list[int], parent: list[str] | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of a node given GPUs ``indices`` (positions among the
    GPUs this process sees)."""
    if parent is None:
        return ",".join(str(i) for i in indices)
    for i in indices:
        if not 0 <= i < len(parent):
            raise ConfigError(
                "device",
                f"GPU {i} is not one of the {len(parent)} this process may use "
                f"({VISIBLE_ENV}={','.join(parent)})",
            )
    return ",".join(parent[i] for i in indices)


def place_nodes(
    node_ids: list[str], gpu_count: int, sizes: Mapping[str, int] | None = None
) -> dict[str, list[int]]:
    """One GPU per node while there are enough, else round robin over the GPUs. A node of
    ``sizes[node] = tp x pp`` ranks takes that many GPUs of its own, one per rank (its
    ranks cannot share one: NCCL refuses two ranks on a device)."""
    if gpu_count < 1:
        raise ConfigError("device", "CUDA was asked for but no GPU is visible")
    sizes = sizes or {}
    if all(sizes.get(n, 1) == 1 for n in node_ids):
        return {node_id: [i % gpu_count] for i, node_id in enumerate(node_ids)}
    need = sum(sizes.get(n, 1) for n in node_ids)
    if need > gpu_count:
        raise ConfigError(
            "device",
            f"{len(node_ids)} nodes of {need} ranks in all need {need} GPUs, one per rank; "
            f"{gpu_count} visible (give a deployment file to place them otherwise)",
        )
    out, first = {}, 0
    for n in node_ids:
        out[n] = list(range(first, first + sizes.get(n, 1)))
        first += sizes.get(n, 1)
    return out


def memory_shares(assignment: Mapping[str, list[int]], utilization: float) -> dict[str, float]:
    """Per node on a shared GPU, the fraction of the GPU's memory it may use: an equal
    part of ``utilization`` (nodes alone on their GPUs are not listed)."""
    per_gpu = Counter(gpu for gpus in assignment.values() for gpu in set(gpus))
    shares = {}
    for node_id, gpus in assignment.items():
        sharing = max((per_gpu[g] for g in gpus), default=1)
        if sharing > 1:
            shares[node_id] = utilization / sharing
    return shares

"""``make_backend``: one place that picks and builds a backend."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from kv_transfer.base import KVTransferBackend
from kv_transfer.cuda_ipc import CudaIpcBackend, cuda_device_uuid
from kv_transfer.errors import InvalidTransferArgument
from kv_transfer.layout import LayerHook
from kv_transfer.links import Group
from kv_transfer.local import LocalBackend, LocalHub
from kv_transfer.p2p import DEFAULT_PIPELINE_DEPTH, P2PBackend

BackendKind = Literal["auto", "gloo", "nccl", "cuda_ipc", "local"]
BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)


def device_identity(device: torch.device | str) -> str:
    """What two processes compare to learn whether they share a GPU (``"cuda:<uuid>"``);
    CPU devices are never shared this way (``"cpu"``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{cuda_device_uuid(index)}"


def resolve_kind(
    kind: str,
    device: torch.device | str,
    *,
    same_process: bool = False,
    peer_device_id: str | None = None,
) -> str:
    """The concrete backend ``kind`` stands for. ``auto``: ``local`` when both caches are in
    this process, ``cuda_ipc`` when the peer's ``device_identity`` is this GPU's, ``nccl``
    for other CUDA caches, ``gloo`` on CPU."""
    if kind not in BACKEND_KINDS:
        raise InvalidTransferArgument(
            "backend", f"unknown backend {kind!r}; known: {', '.join(BACKEND_KINDS)}"
        )
    if kind != "auto":
        return kind
    device = torch.device(device)
    if same_process:
        return "local"
    if device.type == "cuda":
        return "cuda_ipc" if peer_device_id == device_identity(device) else "nccl"
    return "gloo"


def make_backend(
    kind: str = "auto",
    *,
    device: torch.device | str = "cpu",
    group: Group = None,
    hub: LocalHub | None = None,
    rank: int | None = None,
    same_process: bool = False,
    peer_device_id: str | None = None,
    pool: torch.Tensor | None = None,
    checksums: bool = False,
    on_layer_staged: LayerHook | None = None,
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
) -> KVTransferBackend:
    """Build a backend (see ``resolve_kind`` for ``auto``).

    - ``local``: needs ``hub`` and this endpoint's ``rank``.
    - ``gloo`` / ``nccl``: p2p over ``group`` (None: the default group).
    - ``cuda_ipc``: control over ``group`` (gloo); a sender passes its ``pool``.
    ``checksums``: debug checksums per layer (both sides must agree).
    ``pipeline_depth``: gloo/nccl messages in flight (one staging buffer each).
    """
    resolved = resolve_kind(kind, device, same_process=same_process, peer_device_id=peer_device_id)
    if resolved == "local":
        if hub is None or rank is None:
            raise InvalidTransferArgument("hub", "the local backend needs a LocalHub and a rank")
        return LocalBackend(hub, rank, checksums=checksums, on_layer_staged=on_layer_staged)
    device = torch.device(device)
    if resolved == "cuda_ipc":
        if device.type != "cuda":
            raise InvalidTransferArgument("device", f"CUDA IPC needs a CUDA device, got {device}")
        return CudaIpcBackend(
            group, device, pool=pool, checksums=checksums, on_layer_staged=on_layer_staged
        )
    if (resolved == "nccl") != (device.type == "cuda"):
        raise InvalidTransferArgument(
            "device", f"backend {resolved!r} cannot move caches on {device.type}"
        )
    return P2PBackend(
        group,
        device,
        checksums=checksums,
        on_layer_staged=on_layer_staged,
        pipeline_depth=pipeline_depth,
    )

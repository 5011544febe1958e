"""Moving one request's KV blocks from a prefill process's paged cache into a decode
process's: one interface (``KVTransferBackend``), backends chosen by device
(``make_backend``): torch.distributed p2p (gloo on CPU, NCCL across GPUs), CUDA IPC on a
shared GPU, and an in-process copy. See ``docs/kv-transfer.md``.

This package knows nothing about scheduling: it moves blocks it is told to move.
"""

from __future__ import annotations

from kv_transfer.base import KVTransferBackend, TransferStats
from kv_transfer.cuda_ipc import CudaIpcBackend, KVPoolHandle, export_kv_pool, open_kv_pool
from kv_transfer.errors import (
    InvalidTransferArgument,
    KVTransferError,
    TransferChannelError,
    TransferChecksumError,
    TransferMismatch,
    TransferTimeout,
)
from kv_transfer.factory import BACKEND_KINDS, device_identity, make_backend, resolve_kind
from kv_transfer.group import TransferGroup, init_transfer_group
from kv_transfer.local import LocalBackend, LocalHub
from kv_transfer.p2p import P2PBackend
from kv_transfer.pairs import PairGroup, PairGroups, new_endpoint

__all__ = [
    "BACKEND_KINDS",
    "CudaIpcBackend",
    "InvalidTransferArgument",
    "KVPoolHandle",
    "KVTransferBackend",
    "KVTransferError",
    "LocalBackend",
    "LocalHub",
    "P2PBackend",
    "PairGroup",
    "PairGroups",
    "TransferChannelError",
    "TransferChecksumError",
    "TransferGroup",
    "TransferMismatch",
    "TransferStats",
    "TransferTimeout",
    "device_identity",
    "export_kv_pool",
    "init_transfer_group",
    "make_backend",
    "new_endpoint",
    "open_kv_pool",
    "resolve_kind",
]

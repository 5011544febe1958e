"""The process group KV moves over, joined through a TCPStore rendezvous.

Every member calls ``init_transfer_group(rank, world_size, "host:port", backend)`` with
its own rank and the store address; ``backend`` is ``"gloo"`` on CPU and ``"nccl"``
across GPUs (CUDA IPC sends its control messages over gloo), then makes a backend with
``make_backend(..., group=None)`` (the default group made here) and addresses peers by
rank. Tests and benchmarks use this; the served nodes use ``kv_transfer.pairs`` instead,
whose two-member groups let a dead node be replaced.

A timed-out or failed transfer breaks the channel to that peer (see ``TransferTimeout``).
Recovery is collective: every member calls ``TransferGroup.rebuild()`` (the coordinator
tells them to), which destroys the default group and joins a fresh one under a new epoch
prefix in the same store; then each makes a new backend.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from kv_transfer.errors import InvalidTransferArgument, KVTransferError, TransferTimeout


def parse_store_addr(store_addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6 address]:port"`` -> (host, port)."""
    host, sep, port = store_addr.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidTransferArgument(
            "store_addr", f"expected host:port (port 1-65535), got {store_addr!r}"
        )
    return host, int(port)


class TransferGroup:
    """This process's membership of the KV transfer group (the default process group)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        backend: str,
        timeout: float,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.epoch = -1
        self._join(0)

    def _join(self, epoch: int) -> None:
        # A fresh key prefix per epoch: a rebuild never reads the previous rendezvous.
        prefixed = dist.PrefixStore(f"kv_transfer/epoch{epoch}/", self.store)
        try:
            dist.init_process_group(
                self.backend,
                store=prefixed,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=self.timeout),
            )
        except RuntimeError as e:  # DistStoreError and friends: peers that never joined
            if "timeout" in str(e).lower() or "timed out" in str(e).lower():
                raise TransferTimeout("<rendezvous>", -1, "group rendezvous", self.timeout) from e
            raise KVTransferError(f"joining the KV transfer group failed: {e}") from e
        self.epoch = epoch

    def rebuild(self) -> None:
        """Collective: destroy the group and join a fresh one (every member must call it)."""
        self.destroy()
        self._join(self.epoch + 1)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_transfer_group(
    rank: int,
    world_size: int,
    store_addr: str,
    backend: str = "gloo",
    *,
    timeout: float = 60.0,
    host_store: bool | None = None,
) -> TransferGroup:
    """Create (``host_store``, default: rank 0) or join the TCPStore at ``store_addr`` and
    initialise the default process group with ``backend``. ``timeout`` (seconds) bounds the
    rendezvous and is the group's default operation timeout."""
    if backend not in ("gloo", "nccl"):
        raise InvalidTransferArgument("backend", f"{backend!r}; known: gloo, nccl")
    if not 0 <= rank < world_size:
        raise InvalidTransferArgument("rank", f"{rank} is not in [0, {world_size})")
    if dist.is_initialized():
        raise InvalidTransferArgument(
            "group", "this process already has a default process group; destroy it first"
        )
    host, port = parse_store_addr(store_addr)
    is_host = rank == 0 if host_store is None else host_store
    try:
        store = dist.TCPStore(
            host,
            port,
            world_size=None,  # the store does not count members; init_process_group does
            is_master=is_host,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
        )
    except RuntimeError as e:
        raise KVTransferError(f"cannot reach or host the TCPStore at {store_addr}: {e}") from e
    return TransferGroup(store, rank, world_size, backend, timeout)

"""Two-member transfer groups, formed on demand between process incarnations.

A process that moves KV has an endpoint name: its node id plus a random incarnation tag
(``"decode-0@3f9a1c2e"``), new on every start. Two endpoints that must move KV form a
group of their own, of two members, through the shared TCPStore, under a key made of
both names (sorted; the first is rank 0) and the channel's epoch. Nothing has a fixed world size: a node that
dies is replaced by a new process with a new endpoint, which forms new pairs with the
survivors, and the dead incarnation's pairs are never used again. (A default process
group, by contrast, cannot take a member back once one is lost.)

Forming a pair blocks until the peer forms it too (each side does so when it is first
told to move KV with the other) or until the timeout. The groups are process-group
backends made directly from the store (``PairGroup``), which ``PeerLinks`` addresses by
their own ranks.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.errors import InvalidTransferArgument, KVTransferError, TransferTimeout
from kv_transfer.group import parse_store_addr

PAIR_BACKENDS = ("gloo", "nccl")
# A pair group's own operation timeout is this much beyond the transfer timeout: a
# transfer's deadline always fires first, so the channel is marked broken and aborted
# by us, not torn down by NCCL's watchdog (which, by default, kills the process).
GROUP_TIMEOUT_MARGIN_S = 60.0
# NCCL's watchdog on a failed or timed-out operation: 2 aborts the communicator and
# leaves the process alive (torch's default, 3, kills the process: a whole node lost for
# one broken pair).
NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_ERROR_HANDLING = "2"


def group_timeout(transfer_timeout: float) -> float:
    """A pair group's operation timeout for transfers bounded by ``transfer_timeout``."""
    return transfer_timeout + max(transfer_timeout, GROUP_TIMEOUT_MARGIN_S)


def configure_nccl_error_handling() -> None:
    """In a node process, before any NCCL group exists: a failed NCCL operation aborts its
    communicator instead of the process. An operator's own setting is kept."""
    os.environ.setdefault(NCCL_ERROR_HANDLING_ENV, NCCL_ERROR_HANDLING)


def new_endpoint(node_id: str) -> str:
    """A fresh endpoint name for this incarnation of ``node_id``."""
    if not node_id or "@" in node_id or "|" in node_id:
        raise InvalidTransferArgument("node_id", f"{node_id!r} is empty or holds '@' or '|'")
    return f"{node_id}@{secrets.token_hex(4)}"


def pair_transport(backend: str, mine: str, theirs: str) -> str:
    """How two endpoints move KV, from their device identities (``kv_transfer.factory.
    device_identity``): over CUDA IPC when both caches are on the same GPU (NCCL refuses
    two ranks on one device), else over the group ``backend``."""
    if mine == theirs and mine.startswith("cuda:"):
        return "cuda_ipc"
    return backend


def connect_store(store_addr: str, timeout: float) -> dist.TCPStore:
    """A client of the TCPStore at ``store_addr`` (``host:port``); someone else hosts it."""
    host, port = parse_store_addr(store_addr)
    try:
        return dist.TCPStore(
            host,
            port,
            world_size=None,
            is_master=False,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
        )
    except RuntimeError as e:
        raise KVTransferError(f"cannot reach the TCPStore at {store_addr}: {e}") from e


@dataclass(frozen=True, eq=False)
class PairGroup:
    """A two-member group made directly from a store: a process-group backend that
    torch.distributed does not know of (no default group needed), addressed by its own
    ranks 0 and 1."""

    backend: object  # ProcessGroupGloo or ProcessGroupNCCL
    rank: int
    name: str  # "gloo" or "nccl"
    # How the KV moves: the group's backend, or "cuda_ipc" (control over this gloo group)
    # when both endpoints are on one GPU; then ``peer_share`` is what the peer shared for
    # it (its exported KV pool handle).
    transport: str = ""
    peer_share: bytes = b""

    def send(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        return self.backend.send([tensor], peer, 0)

    def recv(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        return self.backend.recv([tensor], peer, 0)

    def abort(self) -> None:
        """NCCL: abort the communicator (its unfinished operations end with an error
        instead of holding the GPU until the watchdog's timeout). Gloo closes a pair's
        connection on a timeout by itself; nothing to do."""
        if self.name == "nccl":
            self.backend.abort()  # type: ignore[attr-defined]


class PairGroups:
    """This endpoint's pair groups, one per peer endpoint, formed on first use through
    the TCPStore at ``store_addr`` (``host:port``).

    ``backend``: ``"gloo"`` (CPU caches, and CUDA IPC's control messages) or ``"nccl"``.
    ``device_id``: this endpoint's ``device_identity``; the two sides swap theirs while
    forming, and a pair on one GPU becomes a gloo group for CUDA IPC (``pair_transport``),
    whose sides also swap ``share()`` (the exported KV pool handle).
    ``timeout`` bounds each formation and each transfer; an NCCL group's own operation
    timeout (its watchdog's) is longer (``group_timeout``), so a transfer's deadline
    fires first. A superseded
    group (an older epoch with the same peer) is aborted.
    Thread-safe; forming pairs with different peers may run in parallel (each formation
    has a store connection of its own: a blocking wait on one must not hold up another).
    """

    def __init__(
        self,
        store_addr: str,
        endpoint: str,
        backend: str,
        timeout: float,
        *,
        device_id: str = "",
        share: Callable[[], bytes] | None = None,
    ) -> None:
        if backend not in PAIR_BACKENDS:
            raise InvalidTransferArgument(
                "backend", f"{backend!r}; known: {', '.join(PAIR_BACKENDS)}"
            )
        parse_store_addr(store_addr)  # a malformed address is named now, not at first use
        self.store_addr = store_addr
        self.endpoint = endpoint
        self.backend = backend
        self.timeout = timeout
        self.device_id = device_id
        self._share = share
        self._groups: dict[tuple[str, int], tuple[PairGroup, int]] = {}
        self._lock = threading.Lock()

    def form(self, peer: str, epoch: int = 0) -> tuple[PairGroup, int]:
        """The group shared with ``peer`` at ``epoch`` and the peer's rank in it; forms it
        (blocking until the peer does the same, or ``TransferTimeout``) when it does not
        exist yet. Both sides must ask for the same epoch: a channel that broke is formed
        again under the next one (whoever coordinates the pair hands it out)."""
        if peer == self.endpoint:
            raise InvalidTransferArgument("peer", f"{peer!r} is this endpoint itself")
        if not isinstance(epoch, int) or epoch < 0:
            raise InvalidTransferArgument("epoch", f"must be an integer >= 0, got {epoch!r}")
        with self._lock:
            known = self._groups.get((peer, epoch))
        if known is not None:
            return known
        first, second = sorted((self.endpoint, peer))
        rank = 0 if self.endpoint == first else 1
        store = connect_store(self.store_addr, self.timeout)
        prefixed = dist.PrefixStore(f"kv_transfer/pair/{first}|{second}/{epoch}/", store)
        try:
            transport, peer_share = self._swap(prefixed, rank)
            name = "gloo" if transport == "cuda_ipc" else self.backend
            group = PairGroup(self._make(prefixed, rank, name), rank, name, transport, peer_share)
        except RuntimeError as e:
            text = str(e).lower()
            if "timeout" in text or "timed out" in text:
                raise TransferTimeout(
                    "<pair>", 1 - rank, f"forming a pair with {peer}", self.timeout
                ) from e
            raise KVTransferError(f"forming a transfer pair with {peer} failed: {e}") from e
        with self._lock:
            superseded = [key for key in self._groups if key[0] == peer and key[1] < epoch]
            dropped = [self._groups.pop(key)[0] for key in superseded]
            self._groups[(peer, epoch)] = (group, 1 - rank)
        for old in dropped:  # a broken channel: its NCCL operations must not linger
            old.abort()
        return group, 1 - rank

    def _swap(self, store: dist.Store, rank: int) -> tuple[str, bytes]:
        """Swap device identities (and, on one GPU, shares) with the peer; blocks until
        the peer has set its own (bounded by the store's timeout)."""
        store.set(f"device/{rank}", self.device_id)
        theirs = store.get(f"device/{1 - rank}").decode()
        transport = pair_transport(self.backend, self.device_id, theirs)
        if transport != "cuda_ipc":
            return transport, b""
        store.set(f"share/{rank}", self._share() if self._share is not None else b"")
        return transport, bytes(store.get(f"share/{1 - rank}"))

    def _make(self, store: dist.Store, rank: int, backend: str) -> object:
        if backend == "gloo":  # the timeout bounds its rendezvous; no watchdog
            return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=self.timeout))
        # NCCL forms its communicator lazily (at the first operation, through the store,
        # whose own timeout bounds that); this one is the watchdog's.
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=group_timeout(self.timeout))
        return dist.ProcessGroupNCCL(store, rank, 2, options)

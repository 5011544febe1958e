"""KV transfers off the node's main thread: one thread per peer node, because a
backend's calls for one peer must not overlap (and run in the same order on both
sides), while calls for different peers may run in parallel. Results come back
through ``completed``.

Peers are KV endpoints (``kv_transfer.pairs``: node id + incarnation). A node is
``tp x pp`` ranks (one, in the node's own process, for tp = pp = 1), and KV moves rank
pair by rank pair: rank ``r`` of a node has the endpoint ``rank_endpoint(endpoint, r)``
and a ``TransferThreads`` of its own over its part of the KV pool. For a transfer with
a peer node of layout ``(tp, pp)`` it runs its pieces of the hand-off plan
(``disagg.engine.parallel.handoff``): each over the channel with one peer rank, a
thread per peer rank. The first transfer with a peer rank forms the pair group with it
and makes the backend that runs over it. A channel that broke fails later calls of its
epoch at once; the coordinator moves the node pair to the next epoch, whose first
transfer forms fresh channels between every rank pair. A replacement node comes with a
new endpoint, hence new pairs."""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from disagg.engine.device import device_thread_pool
from disagg.engine.kv_cache import KVCache
from disagg.engine.parallel.handoff import HandoffPlan, KVNodeLayout, plan_handoff
from disagg.engine.parallel.handoff_kv import move_rank_pieces
from kv_transfer import KVTransferBackend, KVTransferError, TransferStats, make_backend
from kv_transfer.cuda_ipc import CudaIpcBackend, KVPoolHandle, open_kv_pool
from kv_transfer.errors import TransferChannelError, TransferTimeout
from kv_transfer.layout import ByteBuffer
from kv_transfer.pairs import PairGroup, PairGroups

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TransferDone:
    rids: tuple[int, ...]
    role: Literal["send", "recv"]
    peer: str
    epoch: int
    stats: TransferStats | None
    error: str | None = None
    broken_channel: bool = False  # the channel to ``peer`` cannot carry another transfer

    def report(self) -> dict:
        """The fields a ``Pushed``/``Pulled`` report shares (the caller names the peer)."""
        return dict(
            rids=list(self.rids),
            bytes=self.stats.bytes if self.stats else 0,
            seconds=self.stats.seconds if self.stats else 0.0,
            error=self.error,
            broken_peer=self.broken_channel,
            epoch=self.epoch,
        )


def rank_endpoint(endpoint: str, rank: int) -> str:
    """The KV endpoint of rank ``rank`` of the node whose endpoint is ``endpoint``."""
    return f"{endpoint}/r{rank}"


@functools.lru_cache(maxsize=256)
def node_plan(layout: KVNodeLayout, role: str, peer_tp: int, peer_pp: int) -> HandoffPlan:
    """The hand-off plan between a node of ``layout`` that sends (``role`` "send": it
    prefills) or receives (it decodes) and a peer node of layout (peer_tp, peer_pp)."""
    peer = layout.model_copy(update={"tp": peer_tp, "pp": peer_pp})
    return plan_handoff(layout, peer) if role == "send" else plan_handoff(peer, layout)


def merge_stats(stats: list[TransferStats]) -> TransferStats | None:
    """One rank's (or one node's) view of a transfer made of several pieces: their
    bytes added, the longest call's seconds (pieces move in parallel)."""
    if not stats:
        return None
    return dataclasses.replace(
        stats[0],
        bytes=sum(s.bytes for s in stats),
        seconds=max(s.seconds for s in stats),
        num_layers=sum(s.num_layers for s in stats),
    )


def open_pool_handle(share: bytes) -> torch.Tensor:
    """A same-GPU peer's KV pool, from the handle it shared while the pair formed."""
    return open_kv_pool(KVPoolHandle.from_bytes(share))


def pair_backend(
    group: PairGroup,
    *,
    device: torch.device,
    pool: torch.Tensor,
    checksums: bool,
    open_pool: Callable[[bytes], torch.Tensor] = open_pool_handle,
) -> KVTransferBackend:
    """The backend for a pair group as it formed (``PairGroup.transport``): p2p over its
    gloo/NCCL group, or, when both nodes are on one GPU, CUDA IPC with the peer's pool
    mapped (``open_pool`` of what it shared; tests pass a CPU shared pool instead)."""
    if group.transport == "cuda_ipc":
        backend = CudaIpcBackend(group, device, pool=pool, checksums=checksums)
        backend.attach_peer_pool(1 - group.rank, open_pool(group.peer_share))
        return backend
    kind = group.transport or group.name
    return make_backend(kind, device=device, group=group, checksums=checksums)


class TransferThreads:
    """One rank's KV transfers. ``pairs`` is the rank's own (its endpoint is
    ``rank_endpoint(node endpoint, rank)``); ``cache`` its part of the pool; ``layout``
    its node's KV layout. ``make_backend(group)`` builds the backend for one pair group.
    Each peer's thread makes ``device`` (the KV cache's) its current CUDA device before
    anything else."""

    def __init__(
        self,
        pairs: PairGroups,
        make_backend: Callable[[object], KVTransferBackend],
        cache: KVCache,
        layout: KVNodeLayout,
        rank: int,
        timeout: float,
        *,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.pairs = pairs
        self.make_backend = make_backend
        self.cache = cache
        self.layout = layout
        self.rank = rank
        self.block_size = layout.block_size
        self.timeout = timeout
        # Touched by each peer node's own thread only (keys: peer rank endpoints).
        self._backends: dict[str, tuple[int, KVTransferBackend, int]] = {}  # epoch, ..., rank
        self._unformed: dict[tuple[str, int], str] = {}  # why (peer, epoch) did not form
        self._staging: dict[str, ByteBuffer] = {}
        self._peers: dict[str, ThreadPoolExecutor] = {}
        self._done: queue.SimpleQueue[TransferDone] = queue.SimpleQueue()
        self.in_flight = 0
        self.on_done: Callable[[], None] = lambda: None  # called from the transfer thread
        self.failure: str | None = None  # never set here (a rank group's can be)

    def send(
        self,
        rids: tuple[int, ...],
        block_ids: list[int],
        peer: str,
        epoch: int,
        peer_layout: tuple[int, int] = (1, 1),
    ) -> None:
        """One transfer of several requests' blocks, back to back (whole blocks), to
        the ranks of the decode node ``peer`` (of ``peer_layout``: tp, pp), over the
        channels of ``epoch``."""
        self._submit("send", rids, block_ids, peer, epoch, peer_layout)

    def recv(
        self,
        rids: tuple[int, ...],
        block_ids: list[int],
        peer: str,
        epoch: int,
        peer_layout: tuple[int, int] = (1, 1),
    ) -> None:
        self._submit("recv", rids, block_ids, peer, epoch, peer_layout)

    def completed(self) -> list[TransferDone]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(out)
        return out

    def _submit(self, role, rids, block_ids, peer, epoch, peer_layout) -> None:
        pool = self._peers.get(peer)
        if pool is None:
            pool = self._peers[peer] = device_thread_pool(self.device, f"kv-{peer}")
        self.in_flight += 1
        pool.submit(self._run, role, tuple(rids), list(block_ids), peer, epoch, peer_layout)

    def _backend(self, peer: str, epoch: int) -> tuple[KVTransferBackend, int]:
        """The backend of the channel of ``epoch`` with peer rank endpoint ``peer`` and
        the peer's rank in it (on the peer node's thread); a newer epoch replaces an
        older channel. An epoch whose pair could not be formed is not formed again (its
        store keys are spent): the coordinator hands out the next epoch, or the peer is
        gone."""
        known = self._backends.get(peer)
        if known is not None and known[0] == epoch:
            return known[1], known[2]
        if known is not None and known[0] > epoch:
            raise TransferChannelError(peer, f"epoch {epoch} was superseded by {known[0]}")
        if (peer, epoch) in self._unformed:
            raise TransferChannelError(peer, self._unformed[(peer, epoch)])
        try:
            group, peer_rank = self.pairs.form(peer, epoch)
        except KVTransferError as e:
            self._unformed[(peer, epoch)] = f"forming the pair at epoch {epoch} failed: {e}"
            raise TransferChannelError(peer, self._unformed[(peer, epoch)]) from e
        if known is not None:  # the broken channel it replaces: free its staging buffers
            try:
                known[1].close(timeout=0.1)
            except Exception:
                log.debug("closing the channel of epoch %d with %s failed", known[0], peer)
        backend = self.make_backend(group)
        log.info("KV with %s at epoch %d over %s", peer, epoch, backend.name)
        self._backends[peer] = (epoch, backend, peer_rank)
        return backend, peer_rank

    def _run(self, role, rids, block_ids, peer, epoch, peer_layout) -> None:
        # Both sides derive the same id from the same rids; the header carries its digest.
        transfer_id = "+".join(map(str, rids))
        try:
            if not block_ids:
                raise KVTransferError("none of the requests of this transfer is here")
            plan = node_plan(self.layout, role, *peer_layout)
            pieces = plan.from_rank(self.rank) if role == "send" else plan.to_rank(self.rank)
            channels, staging = {}, {}
            for piece in pieces:
                other = piece.dst_rank if role == "send" else piece.src_rank
                if other in channels:
                    continue
                endpoint = rank_endpoint(peer, other)
                channels[other] = self._backend(endpoint, epoch)
                staging[other] = self._staging.setdefault(endpoint, ByteBuffer(self.device))
            stats = move_rank_pieces(
                role,
                transfer_id,
                self.cache,
                pieces,
                block_ids,
                channels,
                num_tokens=len(block_ids) * self.block_size,
                timeout=self.timeout,
                staging=staging,
            )
            self._done.put(TransferDone(rids, role, peer, epoch, merge_stats(stats)))
        except KVTransferError as e:
            broken = isinstance(e, TransferTimeout | TransferChannelError)
            log.warning("KV %s of requests %s with %s failed: %s", role, rids, peer, e)
            self._done.put(TransferDone(rids, role, peer, epoch, None, str(e), broken))
        except Exception as e:
            log.warning("KV %s of requests %s with %s failed: %r", role, rids, peer, e)
            self._done.put(TransferDone(rids, role, peer, epoch, None, repr(e), True))
        self.on_done()

    def close(self) -> None:
        for pool in self._peers.values():
            pool.shutdown(wait=False, cancel_futures=True)

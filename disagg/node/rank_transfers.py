"""KV transfers of a node whose model runs on ``tp x pp`` rank processes.

The ranks hold the KV pool, so the ranks move it: each rank runs a
:class:`~disagg.node.transfers.TransferThreads` over its own part of the pool, with an
endpoint of its own (``rank_endpoint``), and takes its commands from the leader over a
pipe of their own (``RankGroup.kv_conns``; step plans travel on the other pipe, so a
transfer never waits for a step nor a step for a transfer).

The leader's :class:`RankTransfers` has the node-facing interface of
``TransferThreads`` (``send``, ``recv``, ``completed``, ``on_done``): it sends one
:class:`MoveKV` to each rank that has pieces of the hand-off plan with the peer's
layout, and reports the transfer done once every one of them answered — failed if any
rank's part failed (so the decode side recomputes, as for any failed pull), its channel
broken if any rank pair's was. A rank's KV pipe reaching EOF means the rank died: the
node has failed (``failure``), and the node stops, as for a rank lost in a step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Literal

from disagg.engine.kv_cache import KVCache
from disagg.engine.parallel.handoff import KVNodeLayout
from disagg.engine.parallel.plan import RankKVService, Shutdown
from disagg.node.transfers import (
    TransferDone,
    TransferThreads,
    merge_stats,
    node_plan,
    pair_backend,
    rank_endpoint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MoveKV:
    """Leader -> rank: this rank's part of one transfer (``TransferThreads.send/recv``)."""

    seq: int
    role: Literal["send", "recv"]
    rids: tuple[int, ...]
    block_ids: tuple[int, ...]
    peer: str  # the peer node's endpoint
    epoch: int
    peer_layout: tuple[int, int]


@dataclass(frozen=True, slots=True)
class KVMoved:
    """Rank -> leader: its part of transfer ``seq`` ended (``done.error`` if it failed)."""

    seq: int
    rank: int
    done: TransferDone


def make_transfer_threads(
    store: str,
    endpoint: str,
    rank: int,
    cache: KVCache,
    layout: KVNodeLayout,
    timeout: float,
    *,
    checksums: bool = False,
) -> TransferThreads:
    """Rank ``rank``'s transfer threads: its pair groups (NCCL between GPUs, gloo on CPU,
    CUDA IPC between two endpoints on one GPU, found while a pair forms) and backends
    over its pool."""
    from kv_transfer.cuda_ipc import export_kv_pool
    from kv_transfer.factory import device_identity
    from kv_transfer.pairs import PairGroups

    device = cache.data.device
    on_cuda = device.type == "cuda"
    pool = cache.data
    pairs = PairGroups(
        store,
        rank_endpoint(endpoint, rank),
        "nccl" if on_cuda else "gloo",
        timeout,
        device_id=device_identity(device),
        share=(lambda: export_kv_pool(pool).to_bytes()) if on_cuda else None,
    )
    return TransferThreads(
        pairs,
        lambda group: pair_backend(group, device=device, pool=pool, checksums=checksums),
        cache,
        layout,
        rank,
        timeout,
        device=device,
    )


def serve_rank_kv(
    service: RankKVService, rank: int, cache: KVCache, conn: Connection
) -> threading.Thread:
    """In a rank process: a thread that runs the leader's :class:`MoveKV` commands on this
    rank's pool and answers each with :class:`KVMoved`. Ends when the pipe closes or
    says :class:`Shutdown`."""
    threads = make_transfer_threads(
        service.store,
        service.endpoint,
        rank,
        cache,
        service.layout,
        service.timeout,
        checksums=service.checksums,
    )
    pending: dict[tuple[tuple[int, ...], str, str, int], list[int]] = {}
    lock = threading.Lock()

    def answer() -> None:  # on a transfer thread, after it queued its result
        with lock:
            for done in threads.completed():
                key = (done.rids, done.role, done.peer, done.epoch)
                seq = pending[key].pop(0)
                if not pending[key]:
                    del pending[key]
                try:
                    conn.send(KVMoved(seq, rank, done))
                except (BrokenPipeError, OSError):  # the leader is gone; so are we soon
                    return

    threads.on_done = answer

    def run() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, Shutdown):
                break
            assert isinstance(msg, MoveKV), f"unexpected {type(msg).__name__} on the KV pipe"
            with lock:
                pending.setdefault((msg.rids, msg.role, msg.peer, msg.epoch), []).append(msg.seq)
            call = threads.send if msg.role == "send" else threads.recv
            call(msg.rids, list(msg.block_ids), msg.peer, msg.epoch, msg.peer_layout)
        threads.close()

    thread = threading.Thread(target=run, name=f"rank{rank}-kv", daemon=True)
    thread.start()
    return thread


@dataclass(slots=True)
class _Transfer:
    rids: tuple[int, ...]
    role: Literal["send", "recv"]
    peer: str
    epoch: int
    waiting: set[int]  # ranks yet to answer
    parts: list[TransferDone] = field(default_factory=list)


class RankTransfers:
    """The leader's side: ``TransferThreads``' interface over the ranks' KV pipes."""

    def __init__(self, conns: list[Connection], layout: KVNodeLayout):
        self._conns = conns
        self.layout = layout
        self._lock = threading.Lock()
        self._next = 0
        self._open: dict[int, _Transfer] = {}
        self._done: list[TransferDone] = []
        self.in_flight = 0
        self.failure: str | None = None  # a rank's KV pipe closed: the rank died
        self.on_done: Callable[[], None] = lambda: None
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="rank-kv-reader", daemon=True)
        self._reader.start()

    def send(self, rids, block_ids, peer, epoch, peer_layout=(1, 1)) -> None:
        self._submit("send", tuple(rids), block_ids, peer, epoch, peer_layout)

    def recv(self, rids, block_ids, peer, epoch, peer_layout=(1, 1)) -> None:
        self._submit("recv", tuple(rids), block_ids, peer, epoch, peer_layout)

    def completed(self) -> list[TransferDone]:
        with self._lock:
            out, self._done = self._done, []
        self.in_flight -= len(out)
        return out

    def close(self) -> None:
        self._closed = True

    def _submit(self, role, rids, block_ids, peer, epoch, peer_layout) -> None:
        plan = node_plan(self.layout, role, *peer_layout)
        side = (lambda p: p.src_rank) if role == "send" else (lambda p: p.dst_rank)
        ranks = sorted({side(p) for p in plan.pieces})
        self.in_flight += 1
        with self._lock:
            self._next += 1
            seq = self._next
            self._open[seq] = _Transfer(rids, role, peer, epoch, set(ranks))
        msg = MoveKV(seq, role, rids, tuple(block_ids), peer, epoch, tuple(peer_layout))
        for r in ranks:
            try:
                self._conns[r].send(msg)
            except (BrokenPipeError, OSError) as e:
                self._rank_lost(r, f"its KV pipe broke ({e})")
                return

    def _read(self) -> None:
        live = {conn: rank for rank, conn in enumerate(self._conns)}
        while live and not self._closed:
            for conn in wait(list(live), timeout=1.0):
                rank = live[conn]  # type: ignore[index]
                try:
                    msg = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    del live[conn]  # type: ignore[arg-type]
                    if not self._closed:
                        self._rank_lost(rank, "its process ended (KV pipe closed)")
                    continue
                if isinstance(msg, KVMoved):
                    self._part(msg)

    def _part(self, msg: KVMoved) -> None:
        with self._lock:
            t = self._open.get(msg.seq)
            if t is None:
                return
            t.parts.append(msg.done)
            t.waiting.discard(msg.rank)
            if t.waiting:
                return
            del self._open[msg.seq]
            errors = [p for p in t.parts if p.error is not None]
            stats = merge_stats([p.stats for p in t.parts if p.stats is not None])
            self._done.append(
                TransferDone(
                    t.rids,
                    t.role,
                    t.peer,
                    t.epoch,
                    None if errors else stats,
                    errors[0].error if errors else None,
                    any(p.broken_channel for p in t.parts),
                )
            )
        self.on_done()

    def _rank_lost(self, rank: int, why: str) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = f"rank {rank}: {why}"
                log.error("KV transfers: rank %d failed: %s", rank, why)
        self.on_done()

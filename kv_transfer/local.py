"""In-process backend: both caches live in one process (tests, a single-process
deployment). ``send`` gathers every layer into a private staging tensor and posts it to a
``LocalHub``; ``recv`` takes it, checks the header and every layer's checksum, and only
then scatters. The source blocks may be freed as soon as ``send`` returns.

Unlike the channel backends, the sender is not told about the receiver's verdict: a
mismatched or corrupted parcel is consumed by ``recv``, which raises, with the
destination untouched (checksums are all checked before the first scatter). A timed-out
``recv`` breaks nothing: a parcel that arrives later is taken, and rejected, by the next
``recv`` (its request id or sequence number cannot match).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from kv_transfer.base import KVTransferBackend, TransferStats, check_timeout, make_stats
from kv_transfer.blocks import BlockMover
from kv_transfer.errors import InvalidTransferArgument, TransferTimeout
from kv_transfer.header import Flag, HeaderFields, RequestId, Status, Verdict, first_mismatch
from kv_transfer.layout import (
    BlockIds,
    KVLayers,
    KVLayout,
    LayerHook,
    block_id_tensor,
    layer_checksum,
)


@dataclass(frozen=True, slots=True)
class _Parcel:
    header: list[int]
    layers: torch.Tensor  # (L, 2, n, *block_shape)
    checksums: list[int]  # 2 per layer when the CHECKSUMS flag is set


class LocalHub:
    """Mailboxes between the endpoints of one process, one FIFO per (sender, receiver)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._boxes: dict[tuple[int, int], deque[_Parcel]] = {}

    def post(self, src: int, dst: int, parcel: _Parcel) -> None:
        with self._cond:
            self._boxes.setdefault((src, dst), deque()).append(parcel)
            self._cond.notify_all()

    def take(self, src: int, dst: int, timeout: float) -> _Parcel | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._boxes.get((src, dst)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._boxes[(src, dst)].popleft()

    def pending(self, src: int, dst: int) -> int:
        with self._cond:
            return len(self._boxes.get((src, dst), ()))


class LocalBackend(KVTransferBackend):
    """One endpoint (``rank``) of a ``LocalHub``; peers are other ranks of the same hub."""

    name = "local"

    def __init__(
        self,
        hub: LocalHub,
        rank: int,
        *,
        checksums: bool = False,
        on_layer_staged: LayerHook | None = None,
    ) -> None:
        self._hub = hub
        self._rank = rank
        self.checksums = checksums
        self._on_layer_staged = on_layer_staged
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        self._flags = Flag.CHECKSUMS if checksums else Flag(0)

    def send(
        self,
        request_id: RequestId,
        kv_layers: KVLayers,
        block_ids: BlockIds,
        peer: int,
        *,
        num_tokens: int,
        timeout: float,
    ) -> TransferStats:
        start = time.perf_counter()
        check_timeout(timeout)
        self._check_peer(peer)
        layout = KVLayout.of(kv_layers)
        ids = block_id_tensor(block_ids, layout, num_tokens)
        seq = self._send_seq.get(peer, 0)
        fields = HeaderFields.build(seq, request_id, self._flags, layout, num_tokens, len(ids))
        staged = torch.empty(
            (layout.num_layers, 2, len(ids), *layout.block_shape),
            dtype=layout.dtype,
            device=layout.device,
        )
        BlockMover(kv_layers, layout, ids).gather(0, staged)
        sums: list[int] = []
        for i in range(layout.num_layers):
            if self.checksums:
                sums.extend(layer_checksum(staged[i]))
            if self._on_layer_staged is not None:
                self._on_layer_staged(i, staged[i])
        done = [time.perf_counter() - start] * layout.num_layers
        self._send_seq[peer] = seq + 1
        self._hub.post(self._rank, peer, _Parcel(fields.words(), staged, sums))
        return make_stats(self.name, "send", peer, fields, start, 0.0, done)

    def recv(
        self,
        request_id: RequestId,
        kv_layers: KVLayers,
        block_ids: BlockIds,
        peer: int,
        *,
        num_tokens: int,
        timeout: float,
    ) -> TransferStats:
        start = time.perf_counter()
        timeout = check_timeout(timeout)
        self._check_peer(peer)
        layout = KVLayout.of(kv_layers)
        ids = block_id_tensor(block_ids, layout, num_tokens)
        seq = self._recv_seq.get(peer, 0)
        fields = HeaderFields.build(seq, request_id, self._flags, layout, num_tokens, len(ids))
        parcel = self._hub.take(peer, self._rank, timeout)
        if parcel is None:
            raise TransferTimeout(request_id, peer, "header", timeout)
        self._recv_seq[peer] = seq + 1
        expected = fields.words()
        bad = first_mismatch(expected, parcel.header)
        if bad is not None:
            Verdict(Status.MISMATCH, bad, expected[bad], parcel.header[bad]).raise_if_failed(
                request_id, rejected_by_peer=False
            )
        handshake = time.perf_counter() - start
        if self.checksums:
            for i in range(layout.num_layers):
                want, got = parcel.checksums[2 * i : 2 * i + 2], layer_checksum(parcel.layers[i])
                if tuple(want) != got:
                    Verdict(Status.CHECKSUM, i, want[0], got[0]).raise_if_failed(
                        request_id, rejected_by_peer=False
                    )
        BlockMover(kv_layers, layout, ids).scatter(parcel.layers, 0)
        done = [time.perf_counter() - start] * layout.num_layers
        return make_stats(self.name, "recv", peer, fields, start, handshake, done)

    def _check_peer(self, peer: int) -> None:
        if not isinstance(peer, int) or peer == self._rank:
            raise InvalidTransferArgument("peer", f"{peer!r} is not another endpoint of the hub")

"""The contract every KV transfer backend keeps, and what a transfer reports."""

from __future__ import annotations

import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kv_transfer.errors import InvalidTransferArgument
from kv_transfer.header import HeaderFields, RequestId
from kv_transfer.layout import BlockIds, KVLayers


@dataclass(frozen=True, slots=True)
class TransferStats:
    """One side's view of one transfer."""

    request_id: RequestId
    backend: str
    role: Literal["send", "recv"]
    peer: int
    seq: int  # the transfer's sequence number with this peer
    num_layers: int
    num_blocks: int
    bytes: int  # KV payload (K and V of every layer), headers excluded
    seconds: float  # the whole call, validation included
    handshake_seconds: float  # header sent/received and accepted
    layer_done_s: tuple[float, ...]  # per layer: seconds into the call when it was sent/written

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else math.inf

    @property
    def layer_seconds(self) -> tuple[float, ...]:
        """Per layer: time since the previous layer (the first: since the handshake)."""
        marks = (self.handshake_seconds, *self.layer_done_s)
        return tuple(b - a for a, b in itertools.pairwise(marks))


class KVTransferBackend(ABC):
    """Moves one request's KV blocks from a sender's paged cache into a receiver's.

    Contract, for every backend:

    - Both sides call once per transfer, the sender ``send`` and the receiver ``recv``,
      with the same ``request_id`` and ``num_tokens``; transfers between two peers happen
      in the same order on both sides (sequence numbers check it). Calls for one peer
      must not overlap; calls for different peers may run in different threads.
    - ``kv_layers``: one ``(k_cache, v_cache)`` per layer, each (pool_blocks, block_size,
      H_kv, D), as ``KVCache.layers``. ``block_ids``: the request's block table on that
      side, ``ceil(num_tokens / block_size)`` distinct ids; the two sides' ids differ.
    - ``recv`` writes destination blocks only after the sender's header matched what it
      expected (request, token and block counts, layer count, block shape, dtype,
      options); otherwise it raises ``TransferMismatch`` with the destination untouched.
      With debug checksums, a layer is written only after its checksum matched.
    - ``send`` returns once the source blocks may be freed: the receiver confirmed that
      every layer is in its cache (torch.distributed, CUDA IPC) or the KV was copied out
      (local). It raises what the receiver reported (mismatch, checksum).
    - ``timeout`` (seconds) bounds the whole call; past it, ``TransferTimeout``.
    - Failures are typed (``kv_transfer.errors``); each says what state it leaves.
    """

    name: str

    @abstractmethod
    def send(
        self,
        request_id: RequestId,
        kv_layers: KVLayers,
        block_ids: BlockIds,
        peer: int,
        *,
        num_tokens: int,
        timeout: float,
    ) -> TransferStats: ...

    @abstractmethod
    def recv(
        self,
        request_id: RequestId,
        kv_layers: KVLayers,
        block_ids: BlockIds,
        peer: int,
        *,
        num_tokens: int,
        timeout: float,
    ) -> TransferStats: ...

    def close(self, timeout: float = 10.0) -> None:  # noqa: B027 - optional: may hold nothing
        """Finish what is still in flight (up to ``timeout`` s), then release staging
        buffers and mapped peer memory. Call it before destroying the process group."""


def make_stats(
    backend: str,
    role: Literal["send", "recv"],
    peer: int,
    fields: HeaderFields,
    start: float,
    handshake: float,
    layer_done_s: Sequence[float],
) -> TransferStats:
    """Stats of a call that began at ``start`` (time.perf_counter()) and ends now."""
    return TransferStats(
        request_id=fields.request_id,
        backend=backend,
        role=role,
        peer=peer,
        seq=fields.seq,
        num_layers=fields.num_layers,
        num_blocks=fields.num_blocks,
        bytes=fields.num_layers * fields.layer_bytes,
        seconds=time.perf_counter() - start,
        handshake_seconds=handshake,
        layer_done_s=tuple(layer_done_s),
    )


def check_timeout(timeout: float) -> float:
    if not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
        raise InvalidTransferArgument(
            "timeout", f"must be a positive number of seconds, got {timeout!r}"
        )
    return float(timeout)

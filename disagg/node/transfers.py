"""KV transfers off the node's main thread: one thread per peer, because a backend's
calls for one peer must not overlap (and run in the same order on both sides), while
calls for different peers may run in parallel. Results come back through ``completed``."""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from kv_transfer import KVTransferBackend, KVTransferError, TransferStats
from kv_transfer.errors import TransferChannelError, TransferTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TransferDone:
    rids: tuple[int, ...]
    role: Literal["send", "recv"]
    peer: int
    stats: TransferStats | None
    error: str | None = None
    broken_channel: bool = False  # the channel to ``peer`` cannot carry another transfer


class TransferThreads:
    def __init__(
        self, backend: KVTransferBackend, kv_layers: list, block_size: int, timeout: float
    ):
        self.backend = backend
        self.block_size = block_size
        self.kv_layers = kv_layers
        self.timeout = timeout
        self._peers: dict[int, ThreadPoolExecutor] = {}
        self._done: queue.SimpleQueue[TransferDone] = queue.SimpleQueue()
        self.in_flight = 0
        self.on_done: Callable[[], None] = lambda: None  # called from the transfer thread

    def send(self, rids: tuple[int, ...], block_ids: list[int], peer: int) -> None:
        """One transfer of several requests' blocks, back to back (whole blocks)."""
        self._submit("send", rids, block_ids, peer)

    def recv(self, rids: tuple[int, ...], block_ids: list[int], peer: int) -> None:
        self._submit("recv", rids, block_ids, peer)

    def completed(self) -> list[TransferDone]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(out)
        return out

    def _submit(self, role, rids, block_ids, peer) -> None:
        pool = self._peers.get(peer)
        if pool is None:
            pool = self._peers[peer] = ThreadPoolExecutor(1, thread_name_prefix=f"kv-peer{peer}")
        self.in_flight += 1
        pool.submit(self._run, role, tuple(rids), list(block_ids), peer)

    def _run(self, role, rids, block_ids, peer) -> None:
        call = self.backend.send if role == "send" else self.backend.recv
        # Both sides derive the same id from the same rids; the header carries its digest.
        transfer_id = "+".join(map(str, rids))
        try:
            if not block_ids:
                raise KVTransferError("none of the requests of this transfer is here")
            stats = call(
                transfer_id,
                self.kv_layers,
                block_ids,
                peer,
                num_tokens=len(block_ids) * self.block_size,
                timeout=self.timeout,
            )
            self._done.put(TransferDone(rids, role, peer, stats))
            self.on_done()
        except KVTransferError as e:
            broken = isinstance(e, TransferTimeout | TransferChannelError)
            log.warning("KV %s of requests %s with rank %d failed: %s", role, rids, peer, e)
            self._done.put(TransferDone(rids, role, peer, None, str(e), broken))
            self.on_done()
        except Exception as e:
            log.warning("KV %s of requests %s with rank %d failed: %r", role, rids, peer, e)
            self._done.put(TransferDone(rids, role, peer, None, repr(e), True))
            self.on_done()

    def close(self) -> None:
        for pool in self._peers.values():
            pool.shutdown(wait=False, cancel_futures=True)

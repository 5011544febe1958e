"""The transfer protocol over a torch.distributed group, shared by the p2p and CUDA IPC
backends; subclasses only say how the layers themselves move.

    sender                                      receiver
    header (16 int64)  ─────────────────────►   compare with its own expected header
    extension (checksums, source ids) ──────►   (taken even when the header was rejected)
    layer messages (p2p; none for CUDA IPC) ►   accepted: written (p2p: scattered; CUDA
                                                  IPC: copied from the peer's pool);
                                                rejected: received and dropped
                       ◄─────────────────────   verdict: OK, MISMATCH(field), CHECKSUM(layer)

One message back per transfer: the sender does not wait for an acceptance before
sending, and a receiver that rejects the header still takes exactly the messages the
sender's header announces (without touching its cache) before it answers. So every
message is matched on both sides whatever the verdict, and a mismatch or a bad checksum
leaves the channel in step. Only a header this version cannot read (wrong magic, absurd
sizes) leaves the receiver unable to drain: it then marks the peer broken.

The receiver returns as soon as its cache is written; its verdict's send is collected by
the next call with that peer (or ``close``). Deadlines and broken peers: ``links.py``.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kv_transfer.base import KVTransferBackend, TransferStats, make_stats
from kv_transfer.blocks import BlockMover
from kv_transfer.errors import (
    InvalidTransferArgument,
    KVTransferError,
    TransferChecksumError,
    TransferMismatch,
)
from kv_transfer.header import (
    CONTROL_WORDS,
    Flag,
    HeaderFields,
    RequestId,
    SenderHeader,
    Status,
    Verdict,
    first_mismatch,
)
from kv_transfer.layout import (
    BlockIds,
    KVLayers,
    KVLayout,
    StagingBuffers,
    block_id_tensor,
    layer_checksum,
)
from kv_transfer.links import Group, PeerLinks, Xfer


@dataclass(frozen=True, slots=True)
class PayloadResult:
    layer_done_s: tuple[float, ...]
    failure: Verdict | None = None  # a CHECKSUM or MISMATCH verdict to report


class DistChannelBackend(KVTransferBackend):
    """Header, verdict and deadlines over torch.distributed p2p; see the module doc.

    ``device``: where the caches live; ``control_device``: where control messages live
    (the device of the group's backend: CUDA for NCCL, CPU for gloo).
    """

    def __init__(
        self,
        group: Group,
        device: torch.device,
        control_device: torch.device,
        *,
        checksums: bool,
    ) -> None:
        self._links = PeerLinks(group)
        self._device = device
        self._control_device = control_device
        self.checksums = checksums
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        self._unsent: dict[int, dist.Work] = {}  # per peer: the last verdict, maybe in flight
        self._staging: dict[int, StagingBuffers] = {}  # per peer: calls for two peers may overlap

    # -- what subclasses provide ---------------------------------------------------------

    def _flags(self) -> Flag:
        return Flag.CHECKSUMS if self.checksums else Flag(0)

    def _layers_per_message(self, layout: KVLayout, num_blocks: int) -> int:
        """How many consecutive layers one payload message carries (0: no payload)."""
        return 0

    def _payload_messages(self, sender: SenderHeader) -> list[tuple[int, torch.dtype]]:
        """(numel, dtype) of each payload message a sender with this header sends."""
        return []

    def _check_source(self, kv_layers: KVLayers, layout: KVLayout) -> None:
        """Sender-side checks before anything is sent."""
        self._check_device(layout)

    def _check_destination(self, x: Xfer, layout: KVLayout) -> None:
        """Receiver-side checks before the header is received."""
        self._check_device(layout)

    def _check_device(self, layout: KVLayout) -> None:
        if layout.device != self._device:
            raise InvalidTransferArgument(
                "kv_layers", f"caches on {layout.device}; this backend moves {self._device}"
            )

    def _before_header(self, layout: KVLayout) -> None:
        """Called on the sender just before the header leaves."""

    @abstractmethod
    def _send_layers(
        self, x: Xfer, mover: BlockMover, layout: KVLayout, num_blocks: int, per_message: int
    ) -> tuple[float, ...]:
        """Send the layers (or nothing); per layer, when it had left (seconds into the call)."""

    @abstractmethod
    def _recv_layers(
        self,
        x: Xfer,
        mover: BlockMover,
        layout: KVLayout,
        num_blocks: int,
        per_message: int,
        checksums: list[int] | None,
        source_ids: list[int] | None,
    ) -> PayloadResult:
        """Write the layers; after a failure (checksum, source) stop writing, but still
        take every message the header announced."""

    # -- the protocol ----------------------------------------------------------------------

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
        x = self._begin(request_id, peer, timeout)
        layout = KVLayout.of(kv_layers)
        ids = block_id_tensor(block_ids, layout, num_tokens)
        self._check_source(kv_layers, layout)
        fields = self._header(self._send_seq.get(peer, 0), request_id, layout, num_tokens, ids)
        mover = BlockMover(kv_layers, layout, ids) if self.checksums else None
        extension = self._checksums(x, mover, layout, len(ids)) if mover is not None else []
        if Flag.SOURCE_IDS in fields.flags:
            extension += ids.tolist()
        self._before_header(layout)
        self._send_seq[peer] = fields.seq + 1
        with self._exchange(x):
            sent = [(self._links.isend(self._control(fields.words()), x), "header")]
            if extension:
                ext = torch.tensor(extension, dtype=torch.int64, device=self._control_device)
                sent.append((self._links.isend(ext, x), "header extension"))
            handshake = time.perf_counter() - x.start  # the header is out, layers follow
            # Set up while the receiver checks the header.
            verdict_buf = self._control()
            w_verdict = self._links.irecv(verdict_buf, x)
            mover = mover or BlockMover(kv_layers, layout, ids)
            done = self._send_layers(x, mover, layout, len(ids), fields.layers_per_message)
            for work, stage in sent:
                self._links.wait(work, x, stage)
            self._links.wait(w_verdict, x, "verdict")
            verdict = self._verdict(verdict_buf, fields.seq, x)
            verdict.raise_if_failed(request_id, rejected_by_peer=True)
        return make_stats(self.name, "send", x.peer, fields, x.start, handshake, done)

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
        x = self._begin(request_id, peer, timeout)
        layout = KVLayout.of(kv_layers)
        ids = block_id_tensor(block_ids, layout, num_tokens)
        self._check_destination(x, layout)
        fields = self._header(self._recv_seq.get(peer, 0), request_id, layout, num_tokens, ids)
        expected = fields.words()
        mover = BlockMover(kv_layers, layout, ids)  # ready before the header arrives
        header_buf = self._control()
        with self._exchange(x):
            self._links.wait(self._links.irecv(header_buf, x), x, "header")
            self._recv_seq[peer] = fields.seq + 1
            got = header_buf.tolist()
            bad = first_mismatch(expected, got)
            if bad is not None:
                rejection = Verdict(Status.MISMATCH, bad, expected[bad], got[bad])
                self._drain(x, got, rejection)
                self._answer(x, fields.seq, rejection)
                rejection.raise_if_failed(request_id, rejected_by_peer=False)
            ext: list[int] = []
            if fields.extension_words:
                ext_buf = torch.empty(
                    fields.extension_words, dtype=torch.int64, device=self._control_device
                )
                self._links.wait(self._links.irecv(ext_buf, x), x, "header extension")
                ext = ext_buf.tolist()
            handshake = time.perf_counter() - x.start
            n_sums = 2 * layout.num_layers if Flag.CHECKSUMS in fields.flags else 0
            result = self._recv_layers(
                x,
                mover,
                layout,
                len(ids),
                fields.layers_per_message,
                ext[:n_sums] if n_sums else None,
                ext[n_sums:] if Flag.SOURCE_IDS in fields.flags else None,
            )
            # The data is in place: return without waiting for the verdict to be delivered;
            # the next call with this peer (or close) collects that send.
            failure = result.failure
            self._answer(x, fields.seq, failure or Verdict.ok(), wait=failure is not None)
            if failure is not None:
                failure.raise_if_failed(request_id, rejected_by_peer=False)
        return make_stats(
            self.name, "recv", x.peer, fields, x.start, handshake, result.layer_done_s
        )

    @contextmanager
    def _exchange(self, x: Xfer) -> Iterator[None]:
        """Messages are moving: an error that did not end the exchange on both sides
        (anything but a verdict's mismatch or checksum) leaves the channel out of step."""
        try:
            yield
        except (TransferMismatch, TransferChecksumError):
            raise
        except BaseException as e:
            self._links.mark_broken(x.peer, f"a transfer stopped half way: {e!r}")
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` s each) for verdicts still on their way, then release
        the staging buffers."""
        for peer in list(self._unsent):
            self._collect_verdict(Xfer("<close>", peer, timeout, 0.0, time.monotonic() + timeout))
        for staging in self._staging.values():
            staging.release()
        self._staging.clear()

    def staging(self, peer: int) -> StagingBuffers:
        return self._staging.setdefault(peer, StagingBuffers())

    # -- helpers -----------------------------------------------------------------------------

    def _begin(self, request_id: RequestId, peer: int, timeout: float) -> Xfer:
        x = self._links.begin(request_id, peer, timeout)
        self._collect_verdict(x)
        return x

    def _header(
        self,
        seq: int,
        request_id: RequestId,
        layout: KVLayout,
        num_tokens: int,
        ids: torch.Tensor,
    ) -> HeaderFields:
        per_message = self._layers_per_message(layout, len(ids))
        return HeaderFields.build(
            seq, request_id, self._flags(), layout, num_tokens, len(ids), per_message
        )

    def _checksums(
        self, x: Xfer, mover: BlockMover, layout: KVLayout, num_blocks: int
    ) -> list[int]:
        """Sender side, before the header: one extra gather per layer (debug mode only)."""
        (buf,) = self.staging(x.peer).get(layout, num_blocks, count=1)
        sums: list[int] = []
        for i in range(layout.num_layers):
            mover.gather(i, buf)
            sums.extend(layer_checksum(buf[0]))
        return sums

    def _drain(self, x: Xfer, header: list[int], rejection: Verdict) -> None:
        """Take and drop every message a rejected header announces; nothing is written."""
        sender = SenderHeader.parse(header)
        if sender is None:  # not a header: its sender's next messages are unknowable
            self._links.mark_broken(x.peer, "received a header this version cannot follow")
            rejection.raise_if_failed(x.request_id, rejected_by_peer=False)
            return
        if sender.extension_words:
            scratch = torch.empty(
                sender.extension_words, dtype=torch.int64, device=self._control_device
            )
            self._links.wait(self._links.irecv(scratch, x), x, "dropped header extension")
        for numel, dtype in self._payload_messages(sender):
            scratch = torch.empty(numel, dtype=dtype, device=self._device)
            self._links.wait(self._links.irecv(scratch, x), x, "dropped layers")

    def _answer(self, x: Xfer, seq: int, verdict: Verdict, *, wait: bool = True) -> None:
        work = self._links.isend(self._control(verdict.words(seq)), x)
        if wait:
            self._links.wait(work, x, "verdict")
        else:
            self._unsent[x.peer] = work

    def _collect_verdict(self, x: Xfer) -> None:
        """Wait for the previous call's verdict to this peer to have left."""
        work = self._unsent.pop(x.peer, None)
        if work is not None:
            self._links.wait(work, x, "delivery of the previous verdict")

    def _control(self, words: list[int] | None = None) -> torch.Tensor:
        if words is None:
            return torch.empty(CONTROL_WORDS, dtype=torch.int64, device=self._control_device)
        return torch.tensor(words, dtype=torch.int64, device=self._control_device)

    def _verdict(self, buf: torch.Tensor, seq: int, x: Xfer) -> Verdict:
        try:
            return Verdict.parse(buf.tolist(), seq)
        except KVTransferError as e:
            self._links.mark_broken(x.peer, str(e))
            raise


def first_bad_layer(buf: torch.Tensor, first: int, checksums: list[int]) -> Verdict | None:
    """A CHECKSUM verdict for the first layer of a staged message (count, 2, n, ...) whose
    checksum differs from the sender's (``checksums``: 2 words per layer of the request)."""
    for j in range(buf.shape[0]):
        i = first + j
        expected, got = checksums[2 * i : 2 * i + 2], layer_checksum(buf[j])
        if tuple(expected) != got:
            word = 0 if expected[0] != got[0] else 1
            return Verdict(Status.CHECKSUM, i, expected[word], got[word])
    return None

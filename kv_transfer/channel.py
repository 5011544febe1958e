"""The transfer protocol over a torch.distributed group, shared by the p2p and CUDA IPC
backends; subclasses only say how the layers themselves move.

    sender                                      receiver
    opening: header (16 int64)  ────────────►   compare with its own expected header
      + extension (checksums, source ids)       (taken even when the header was rejected)
      + every layer, if the transfer is small (gloo p2p: ``layers_per_message`` 0)
    layer messages (p2p; none for CUDA IPC) ►   accepted: written (p2p: scattered; CUDA
                                                  IPC: copied from the peer's pool);
                                                rejected: received and dropped
                       ◄─────────────────────   verdict: OK, MISMATCH(field), CHECKSUM(layer)

Over gloo (control messages on the CPU) the header, the extension and a small transfer's
layers travel as one *opening message*, into a receive of ``OPENING_MESSAGE_BYTES`` the
receiver posts before it has built anything else: a small transfer is one message each
way, and the sender finds its receive already posted (otherwise gloo waits for the
receiver's notification first). NCCL needs matching sizes: there the header and the
extension are messages of their exact sizes.

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
    OPENING_MESSAGE_BYTES,
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
    ByteBuffer,
    KVLayers,
    KVLayout,
    LayerHook,
    StagingBuffers,
    block_id_tensor,
    layer_checksum,
)
from kv_transfer.links import Group, PeerLinks, Xfer
from kv_transfer.streams import TransferStreams


@dataclass(frozen=True, slots=True)
class _Opening:
    """The receive posted for a transfer's first message: over gloo a buffer of
    ``OPENING_MESSAGE_BYTES`` (uint8), over NCCL the header's exact int64 words."""

    buf: torch.Tensor
    work: dist.Work

    def words(self, first: int, count: int) -> list[int]:
        return self.buf.view(torch.int64)[first : first + count].tolist()

    def layers(self, fields: HeaderFields) -> torch.Tensor:
        """The layers that follow the header and the extension (an inline transfer)."""
        start = 8 * (CONTROL_WORDS + fields.extension_words)
        flat = self.buf[start : start + fields.payload_bytes]
        return flat.view(fields.dtype).view(fields.message_shape(fields.num_layers))


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
        on_layer_staged: LayerHook | None = None,
    ) -> None:
        self._links = PeerLinks(group)
        self._device = device
        self._control_device = control_device
        # gloo: header, extension (and small transfers' layers) in one opening message.
        # NCCL (or gloo in NCCL's order, tests) matches exact sizes in posting order.
        self._opening_message = control_device.type == "cpu" and not self._links.ordered
        self.checksums = checksums
        self._on_layer_staged = on_layer_staged
        self._opening_out: dict[int, ByteBuffer] = {}  # per peer: the last opening sent
        self._opening_in: dict[int, ByteBuffer] = {}  # per peer: the opening receive
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        self._unsent: dict[int, dist.Work] = {}  # per peer: the last verdict, maybe in flight
        self._staging: dict[int, StagingBuffers] = {}  # per peer: calls for two peers may overlap
        self._streams = TransferStreams(device)  # CUDA: each peer's transfers on its own stream

    # -- what subclasses provide ---------------------------------------------------------

    def _flags(self) -> Flag:
        return Flag.CHECKSUMS if self.checksums else Flag(0)

    def _layers_per_message(self, layout: KVLayout, num_blocks: int) -> int:
        """How many consecutive layers one payload message carries (0: no layer
        messages: the layers ride in the opening message if ``_inline``, else the
        backend moves them another way)."""
        return 0

    def _inline(self, fields: HeaderFields) -> bool:
        """Whether the layers of this transfer travel in the opening message."""
        return False

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
        self._links.begin(request_id, peer, timeout)  # argument checks before the stream
        with self._streams.use(peer, after_compute=True):  # reads what compute wrote
            return self._send(request_id, kv_layers, block_ids, peer, num_tokens, timeout)

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
        self._links.begin(request_id, peer, timeout)
        # Writes blocks nobody reads yet; synchronised with the host before it returns.
        with self._streams.use(peer, after_compute=False):
            return self._recv(request_id, kv_layers, block_ids, peer, num_tokens, timeout)

    def _send(
        self,
        request_id: RequestId,
        kv_layers: KVLayers,
        block_ids: BlockIds,
        peer: int,
        num_tokens: int,
        timeout: float,
    ) -> TransferStats:
        x = self._begin(request_id, peer, timeout)
        layout = KVLayout.of(kv_layers)
        ids = block_id_tensor(block_ids, layout, num_tokens)
        self._check_source(kv_layers, layout)
        fields = self._header(self._send_seq.get(peer, 0), request_id, layout, num_tokens, ids)
        inline = self._inline(fields)
        mover = BlockMover(kv_layers, layout, ids) if self.checksums or inline else None
        extension = self._checksums(x, mover, layout, len(ids)) if self.checksums else []
        if Flag.SOURCE_IDS in fields.flags:
            extension += ids.tolist()
        if self._opening_message and 8 * (CONTROL_WORDS + len(extension)) > OPENING_MESSAGE_BYTES:
            raise InvalidTransferArgument(
                "block_ids",
                f"{len(ids)} blocks: the header extension ({len(extension)} words) does not "
                f"fit in the {OPENING_MESSAGE_BYTES >> 20} MiB opening message",
            )
        self._before_header(layout)
        self._send_seq[peer] = fields.seq + 1
        with self._exchange(x):
            verdict_buf = self._control()
            # gloo: posted first, so the receiver's answer never waits for it. NCCL runs a
            # pair's operations in posting order: a receive posted before the header would
            # hold the header back until the verdict came, and the verdict waits for the
            # header. There it is posted after the last send, where the receiver sends it.
            ordered = self._links.ordered
            w_verdict = None if ordered else self._links.irecv(verdict_buf, x)
            sent = self._send_opening(x, fields, extension, mover if inline else None)
            handshake = time.perf_counter() - x.start  # the header is out, layers follow
            done: tuple[float, ...] = ()
            if not inline:
                mover = mover or BlockMover(kv_layers, layout, ids)
                done = self._send_layers(x, mover, layout, len(ids), fields.layers_per_message)
            for work, stage in sent:
                self._links.wait(work, x, stage)
            if inline:
                done = (time.perf_counter() - x.start,) * layout.num_layers
            if w_verdict is None:
                w_verdict = self._links.irecv(verdict_buf, x)
            self._links.wait(w_verdict, x, "verdict")
            verdict = self._verdict(verdict_buf, fields.seq, x)
            verdict.raise_if_failed(request_id, rejected_by_peer=True)
        return make_stats(self.name, "send", x.peer, fields, x.start, handshake, done)

    def _recv(
        self,
        request_id: RequestId,
        kv_layers: KVLayers,
        block_ids: BlockIds,
        peer: int,
        num_tokens: int,
        timeout: float,
    ) -> TransferStats:
        x = self._begin(request_id, peer, timeout)
        layout = KVLayout.of(kv_layers)
        ids = block_id_tensor(block_ids, layout, num_tokens)
        self._check_destination(x, layout)
        fields = self._header(self._recv_seq.get(peer, 0), request_id, layout, num_tokens, ids)
        with self._exchange(x):
            opening = self._post_opening(x)  # posted first: the sender rarely waits for it
            mover = BlockMover(kv_layers, layout, ids)  # built while the opening travels
            expected = fields.words()
            self._links.wait(opening.work, x, "header")
            self._recv_seq[peer] = fields.seq + 1
            got = opening.words(0, CONTROL_WORDS)
            bad = first_mismatch(expected, got)
            if bad is not None:
                rejection = Verdict(Status.MISMATCH, bad, expected[bad], got[bad])
                self._drain(x, got, rejection)
                self._answer(x, fields.seq, rejection)
                rejection.raise_if_failed(request_id, rejected_by_peer=False)
            ext = self._extension(x, opening, fields.extension_words)
            handshake = time.perf_counter() - x.start
            n_sums = 2 * layout.num_layers if Flag.CHECKSUMS in fields.flags else 0
            checksums = ext[:n_sums] if n_sums else None
            if self._inline(fields):
                result = self._write_inline(x, mover, opening.layers(fields), checksums)
            else:
                result = self._recv_layers(
                    x,
                    mover,
                    layout,
                    len(ids),
                    fields.layers_per_message,
                    checksums,
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

    def _send_opening(
        self, x: Xfer, fields: HeaderFields, extension: list[int], mover: BlockMover | None
    ) -> list[tuple[dist.Work, str]]:
        """Post the header and the extension (and, with ``mover``, every layer)."""
        if not self._opening_message:  # NCCL: each of its exact size
            sent = [(self._links.isend(self._control(fields.words()), x), "header")]
            if extension:
                ext = torch.tensor(extension, dtype=torch.int64, device=self._control_device)
                sent.append((self._links.isend(ext, x), "header extension"))
            return sent
        words = fields.words() + extension
        control = 8 * len(words)
        size = control + (fields.payload_bytes if mover is not None else 0)
        buf = self._opening_out.setdefault(x.peer, ByteBuffer(self._control_device)).get(size)
        buf[:control].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))
        if mover is not None:
            layers = buf[control:].view(fields.dtype).view(fields.message_shape(fields.num_layers))
            mover.gather(0, layers)
            self._staged(0, layers)
        return [(self._links.isend(buf, x), "opening message")]

    def _staged(self, first: int, message: torch.Tensor) -> None:
        """Test hook: staged layers (p2p: on the sender before they leave; CUDA IPC: on
        the receiver before their checksums are checked)."""
        if self._on_layer_staged is not None:
            for j in range(len(message)):
                self._on_layer_staged(first + j, message[j])

    def _post_opening(self, x: Xfer) -> _Opening:
        if self._opening_message:
            buf = self._opening_in.setdefault(x.peer, ByteBuffer(self._control_device))
            slot = buf.get(OPENING_MESSAGE_BYTES)
            return _Opening(slot, self._links.irecv(slot, x))
        header = self._control()
        return _Opening(header, self._links.irecv(header, x))

    def _extension(self, x: Xfer, opening: _Opening, words: int) -> list[int]:
        if not words:
            return []
        if self._opening_message:
            return opening.words(CONTROL_WORDS, words)
        buf = torch.empty(words, dtype=torch.int64, device=self._control_device)
        self._links.wait(self._links.irecv(buf, x), x, "header extension")
        return buf.tolist()

    def _write_inline(
        self, x: Xfer, mover: BlockMover, layers: torch.Tensor, checksums: list[int] | None
    ) -> PayloadResult:
        """Write the layers that came in the opening message, up to the first bad
        checksum."""
        failure = first_bad_layer(layers, 0, checksums) if checksums is not None else None
        good = len(layers) if failure is None else failure.detail
        if good:
            mover.scatter(layers[:good], 0)
        return PayloadResult((time.perf_counter() - x.start,) * len(layers), failure)

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
        self._opening_out.clear()
        self._opening_in.clear()
        self._links.close()

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
        if sender.extension_words and not self._opening_message:
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

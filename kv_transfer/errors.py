"""Typed errors of a KV transfer.

Every one derives from :class:`KVTransferError` (itself a :class:`disagg.errors.DisaggError`)
and says what went wrong and what the caller must do about the destination blocks and the
channel. Whatever the error, the receiving side's rule holds: no destination block is
written from a header that did not match (see ``docs/kv-transfer.md``).
"""

from __future__ import annotations

from disagg.errors import DisaggError


class KVTransferError(DisaggError):
    """Base class of every error a KV transfer raises on purpose."""


class InvalidTransferArgument(KVTransferError, ValueError):
    """A caller passed something unusable (layer shapes, block ids, token count, peer);
    nothing was sent or written. ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TransferMismatch(KVTransferError):
    """The sender's header disagrees with what the receiver expected (request, token or
    block count, layer count, block shape, dtype, options, or sequence number).

    Raised on the receiver before any destination block is written, and on the sender
    when the receiver rejected its header (``rejected_by_peer``). Both sides stay in step:
    the channel remains usable for the next transfer.
    """

    def __init__(
        self, request_id: object, field: str, expected: int, got: int, *, rejected_by_peer: bool
    ) -> None:
        where = "the receiver rejected the header" if rejected_by_peer else "header mismatch"
        super().__init__(
            f"request {request_id!r}: {where}: {field} expected {expected}, got {got}; "
            "no destination block was written"
        )
        self.request_id = request_id
        self.field = field
        self.expected = expected
        self.got = got
        self.rejected_by_peer = rejected_by_peer


class TransferChecksumError(KVTransferError):
    """A layer's debug checksum did not match (the KV was corrupted on the way).

    Layers ``[0, written_layers)`` are already in the destination blocks, ``layer`` and
    later ones are not: the destination blocks hold a mix and the caller must free them
    (and retry). The channel stays usable: the receiver drains the remaining layers first.
    """

    def __init__(self, request_id: object, layer: int, *, written_layers: int, detail: str) -> None:
        super().__init__(
            f"request {request_id!r}: layer {layer} failed its checksum ({detail}); "
            f"layers [0, {written_layers}) were written: free the destination blocks and retry"
        )
        self.request_id = request_id
        self.layer = layer
        self.written_layers = written_layers


class TransferTimeout(KVTransferError):
    """The transfer did not finish within its deadline.

    On the torch.distributed backends a timed-out wait closes the connection to that peer
    (gloo does so itself), so the channel is broken: every later call for that peer
    raises :class:`TransferChannelError` until the group is rebuilt
    (``TransferGroup.rebuild`` on every member) and a new backend is made. Destination
    blocks may be partly written: free them.
    """

    def __init__(self, request_id: object, peer: int, stage: str, timeout: float) -> None:
        super().__init__(
            f"request {request_id!r}: peer {peer} did not complete the {stage} within "
            f"{timeout:.3g} s; free the destination blocks and rebuild the transfer group"
        )
        self.request_id = request_id
        self.peer = peer
        self.stage = stage
        self.timeout = timeout


class TransferChannelError(KVTransferError):
    """The channel to a peer failed (the peer closed it, died, or an earlier timeout broke
    it). Rebuild the transfer group and make a new backend; free the destination blocks."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(
            f"channel to peer {peer} is broken: {reason}; rebuild the transfer group "
            "(TransferGroup.rebuild on every member) and make a new backend"
        )
        self.peer = peer
        self.reason = reason

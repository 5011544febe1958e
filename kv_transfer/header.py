"""The transfer header and the verdicts: fixed-size int64 control messages.

Every control message starts with ``CONTROL_WORDS`` int64 words, so a receiver can always
post its receive before it knows anything about the sender, and a garbled or unexpected
message is caught by its first three words (magic, version, kind). Over gloo the header
is the start of the *opening message*, which also carries the extension and, for a
transfer small enough, every layer (``layers_per_message`` 0): the receiver posts one
receive of ``OPENING_MESSAGE_BYTES`` before it knows the sender's sizes, since gloo takes
a shorter message into a longer receive (a longer one would abort the receiving
process, so no sender's opening message exceeds it). The word layout is in
``docs/kv-transfer.md``; ``HEADER_FIELDS`` and ``VERDICT_FIELDS`` name the words.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum, IntFlag

import torch

from kv_transfer.errors import (
    InvalidTransferArgument,
    KVTransferError,
    TransferChecksumError,
    TransferMismatch,
)
from kv_transfer.layout import KVLayout

RequestId = int | str

MAGIC = int.from_bytes(b"DISAGGKV", "big")  # fits in a signed int64: 'D' < 0x80
VERSION = 2
CONTROL_WORDS = 16
# The largest opening message a sender sends over gloo: a wire constant, the size of the
# receiver's first receive of every transfer.
OPENING_MESSAGE_BYTES = 8 << 20

HEADER_FIELDS: tuple[str, ...] = (
    "magic",
    "version",
    "kind",
    "seq",
    "request_id",
    "flags",
    "num_layers",
    "num_blocks",
    "num_tokens",
    "block_size",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "layer_bytes",
    "extension_words",
    "layers_per_message",
)
VERDICT_FIELDS: tuple[str, ...] = (
    "magic",
    "version",
    "kind",
    "seq",
    "status",
    "detail",
    "expected",
    "got",
)
# Verdict "detail" of a MISMATCH names one of these: the header's fields, then checks a
# receiver can only make after the header (CUDA IPC: the attached pool of the sender and
# the sender's block ids).
MISMATCH_FIELDS: tuple[str, ...] = (*HEADER_FIELDS, "source_pool", "source_block_ids")


class Kind(IntEnum):
    HEADER = 1  # sender -> receiver, first
    VERDICT = 2  # receiver -> sender, last: every layer written (OK), or not (why)


class Flag(IntFlag):
    CHECKSUMS = 1  # 2 checksum words per layer follow the header
    SOURCE_IDS = 2  # the sender's block ids follow (CUDA IPC: the receiver reads them)


class Status(IntEnum):
    OK = 0
    MISMATCH = 1  # detail: index into MISMATCH_FIELDS; expected, got: the two values
    CHECKSUM = 2  # detail: the layer; expected, got: the first differing checksum word


# Stable codes for the dtypes a KV cache may have (the wire must not depend on torch's
# enum order).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.float8_e4m3fn: 5,
    torch.float8_e5m2: 6,
    torch.int8: 7,
    torch.uint8: 8,
}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        known = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise InvalidTransferArgument("dtype", f"{dtype} cannot be sent; known: {known}") from None


def request_digest(request_id: RequestId) -> int:
    """63-bit digest of a request id (ints and strings alike: ``7`` and ``"7"`` agree)."""
    digest = hashlib.blake2b(str(request_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True, slots=True)
class HeaderFields:
    """What both sides know about one transfer; each side builds its own from its inputs."""

    seq: int
    request_id: RequestId
    flags: Flag
    num_layers: int
    num_blocks: int
    num_tokens: int
    block_shape: tuple[int, int, int]  # (block_size, H_kv, D)
    dtype: torch.dtype
    layer_bytes: int  # K and V of one layer: 2 * num_blocks * bytes per block
    extension_words: int  # int64 words sent right after the header
    layers_per_message: int  # consecutive layers sent as one message (0: no layer messages)

    @classmethod
    def build(
        cls,
        seq: int,
        request_id: RequestId,
        flags: Flag,
        layout: KVLayout,
        num_tokens: int,
        num_blocks: int,
        layers_per_message: int = 0,
    ) -> HeaderFields:
        extension = (2 * layout.num_layers if Flag.CHECKSUMS in flags else 0) + (
            num_blocks if Flag.SOURCE_IDS in flags else 0
        )
        return cls(
            seq=seq,
            request_id=request_id,
            flags=flags,
            num_layers=layout.num_layers,
            num_blocks=num_blocks,
            num_tokens=num_tokens,
            block_shape=layout.block_shape,
            dtype=layout.dtype,
            layer_bytes=layout.layer_bytes(num_blocks),
            extension_words=extension,
            layers_per_message=layers_per_message,
        )

    @property
    def payload_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def message_shape(self, layers: int) -> tuple[int, ...]:
        """A message of ``layers`` consecutive layers: (layers, 2, num_blocks, *block_shape)."""
        return (layers, 2, self.num_blocks, *self.block_shape)

    def words(self) -> list[int]:
        block_size, heads, head_dim = self.block_shape
        words = [
            MAGIC,
            VERSION,
            Kind.HEADER,
            self.seq,
            request_digest(self.request_id),
            int(self.flags),
            self.num_layers,
            self.num_blocks,
            self.num_tokens,
            block_size,
            heads,
            head_dim,
            dtype_code(self.dtype),
            self.layer_bytes,
            self.extension_words,
            self.layers_per_message,
        ]
        assert len(words) == CONTROL_WORDS
        return [int(w) for w in words]


@dataclass(frozen=True, slots=True)
class SenderHeader:
    """The parts of a received header that say what the sender will send after it, so a
    receiver that rejects the header can still take (and drop) exactly those messages."""

    num_layers: int
    num_blocks: int
    block_shape: tuple[int, int, int]
    dtype: torch.dtype
    extension_words: int
    layers_per_message: int

    # Above this a header is treated as garbage rather than drained (a sanity bound).
    MAX_MESSAGE_BYTES = 1 << 36

    @classmethod
    def parse(cls, words: list[int]) -> SenderHeader | None:
        """None when the words are not a header this version can follow."""
        if words[:3] != [MAGIC, VERSION, Kind.HEADER]:
            return None
        layers, blocks, _, bs, heads, dim, code, _, ext, per_msg = words[6:16]
        dtype = next((d for d, c in DTYPE_CODES.items() if c == code), None)
        sizes_ok = min(layers, blocks, bs, heads, dim) >= 1 and 0 <= per_msg <= layers
        if dtype is None or not sizes_ok or not 0 <= ext <= cls.MAX_MESSAGE_BYTES // 8:
            return None
        header = cls(layers, blocks, (bs, heads, dim), dtype, ext, per_msg)
        if header.message_numel(per_msg) * dtype.itemsize > cls.MAX_MESSAGE_BYTES:
            return None
        return header

    def message_numel(self, layers: int) -> int:
        bs, heads, dim = self.block_shape
        return layers * 2 * self.num_blocks * bs * heads * dim


def first_mismatch(expected: list[int], got: list[int]) -> int | None:
    """Index of the first differing word (magic, version and kind come first, so a
    message that is not a header at all is reported as such)."""
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        if e != g:
            return i
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    detail: int
    expected: int
    got: int

    @classmethod
    def ok(cls) -> Verdict:
        return cls(Status.OK, 0, 0, 0)

    def words(self, seq: int) -> list[int]:
        words = [
            MAGIC,
            VERSION,
            Kind.VERDICT,
            seq,
            self.status,
            self.detail,
            self.expected,
            self.got,
        ]
        return [int(w) for w in words] + [0] * (CONTROL_WORDS - len(words))

    @classmethod
    def parse(cls, words: list[int], seq: int) -> Verdict:
        """Raises KVTransferError when the message is not the verdict this side waits for
        (the two sides are out of step: a protocol bug or a stray message)."""
        head = words[:4]
        if head != [MAGIC, VERSION, Kind.VERDICT, seq] or words[4] not in tuple(Status):
            raise KVTransferError(
                f"expected the verdict of transfer {seq}, got control words "
                f"{words[:8]}: the two sides are out of step; rebuild the transfer group"
            )
        return cls(Status(words[4]), words[5], words[6], words[7])

    def raise_if_failed(self, request_id: RequestId, *, rejected_by_peer: bool) -> None:
        if self.status == Status.MISMATCH:
            field = MISMATCH_FIELDS[self.detail] if 0 <= self.detail < len(MISMATCH_FIELDS) else "?"
            raise TransferMismatch(
                request_id, field, self.expected, self.got, rejected_by_peer=rejected_by_peer
            )
        if self.status == Status.CHECKSUM:
            raise TransferChecksumError(
                request_id,
                self.detail,
                written_layers=self.detail,
                detail=f"expected {self.expected}, got {self.got}",
            )

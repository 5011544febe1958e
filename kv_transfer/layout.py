"""What a transfer moves and how it is staged: the layer list's shape, block ids,
per-layer staging buffers and the debug checksum.

A layer crosses the channel as one contiguous (2, n, block_size, H_kv, D) tensor: K's n
blocks then V's, in block-table order, whatever the block ids on either side.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kv_transfer.errors import InvalidTransferArgument

KVLayers = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)
BlockIds = Sequence[int] | torch.Tensor
# Test hook: called with (layer, staged (2, n, *block_shape) buffer) where a layer is
# staged before its checksum is checked on the receiver; tests corrupt it there.
LayerHook = Callable[[int, torch.Tensor], None]

# Per-block sums are reduced modulo this prime before the position-weighted sum, so the
# weighted sum cannot overflow int64 (rows * rows * P < 2**63 for any realistic request).
_CHECKSUM_PRIME = 2_147_483_647


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape shared by every layer's K and V cache: (pool_blocks, *block_shape)."""

    num_layers: int
    pool_blocks: int
    block_shape: tuple[int, int, int]  # (block_size, H_kv, D)
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, kv_layers: KVLayers) -> KVLayout:
        if len(kv_layers) == 0:
            raise InvalidTransferArgument("kv_layers", "no layers")
        first = kv_layers[0][0]
        if first.dim() != 4:
            raise InvalidTransferArgument(
                "kv_layers",
                f"each cache must be (blocks, block_size, H_kv, D); got shape {tuple(first.shape)}",
            )
        b, bs, h, d = first.shape
        contiguous_block = (h * d, d, 1)  # strides inside a block; between blocks: free
        reference = (first.shape, first.dtype, first.device)
        for i, pair in enumerate(kv_layers):
            if len(pair) != 2:
                raise InvalidTransferArgument("kv_layers", f"layer {i} is not a (k, v) pair")
            for name, t in zip("kv", pair, strict=True):
                if (t.shape, t.dtype, t.device) != reference:
                    raise InvalidTransferArgument(
                        "kv_layers",
                        f"layer {i} {name}: {tuple(t.shape)} {t.dtype} on {t.device} differs "
                        f"from layer 0 k: {tuple(first.shape)} {first.dtype} on {first.device}",
                    )
                if t.stride()[1:] != contiguous_block:
                    raise InvalidTransferArgument(
                        "kv_layers", f"layer {i} {name}: each block must be contiguous"
                    )
        return cls(len(kv_layers), b, (bs, h, d), first.dtype, first.device)

    @property
    def block_bytes(self) -> int:
        bs, h, d = self.block_shape
        return bs * h * d * self.dtype.itemsize

    def layer_bytes(self, num_blocks: int) -> int:
        return 2 * num_blocks * self.block_bytes


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_id_tensor(block_ids: BlockIds, layout: KVLayout, num_tokens: int) -> torch.Tensor:
    """The request's block table as an int64 tensor on the cache's device, after checking
    it holds exactly ceil(num_tokens / block_size) distinct ids of existing blocks."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise InvalidTransferArgument("num_tokens", f"must be an int >= 1, got {num_tokens!r}")
    raw = block_ids.tolist() if isinstance(block_ids, torch.Tensor) else list(block_ids)
    try:
        ids = [operator.index(i) for i in raw]
    except TypeError:
        raise InvalidTransferArgument("block_ids", f"must be ints, got {raw[:5]}") from None
    need = blocks_for(num_tokens, layout.block_shape[0])
    if len(ids) != need:
        raise InvalidTransferArgument(
            "block_ids",
            f"{num_tokens} tokens in blocks of {layout.block_shape[0]} need {need} blocks, "
            f"got {len(ids)}",
        )
    bad = [i for i in ids if not 0 <= i < layout.pool_blocks]
    if bad:
        raise InvalidTransferArgument(
            "block_ids", f"{bad[:5]} are not block ids of a {layout.pool_blocks}-block cache"
        )
    if len(set(ids)) != len(ids):
        raise InvalidTransferArgument("block_ids", "a block id appears twice")
    return torch.tensor(ids, dtype=torch.int64, device=layout.device)


def layer_checksum(buf: torch.Tensor) -> tuple[int, int]:
    """Debug checksum of one staged layer (2, n, *block_shape): the sum of its bytes read
    as integers, and a block-position-weighted sum of per-block sums (catches blocks that
    arrive in the wrong order). Bit-exact: -0.0 and 0.0 or two NaN payloads differ."""
    rows = buf.shape[0] * buf.shape[1]
    flat = buf.reshape(rows, -1)  # (2n, block_numel)
    row_bytes = flat.shape[1] * buf.element_size()
    word = torch.int32 if row_bytes % 4 == 0 else torch.int16 if row_bytes % 2 == 0 else torch.uint8
    per_block = flat.view(word).sum(dim=1, dtype=torch.int64)  # (2n,)
    weights = torch.arange(1, rows + 1, dtype=torch.int64, device=buf.device)
    weighted = (per_block % _CHECKSUM_PRIME) * weights
    return int(per_block.sum()), int(weighted.sum())


class StagingBuffers:
    """Reusable message buffers (two: double buffering), grown to the largest transfer
    seen and kept until ``release``: a pipeline fills one while the other is on the wire."""

    def __init__(self) -> None:
        self._flat: list[torch.Tensor] = []

    def get(
        self, layout: KVLayout, num_blocks: int, layers: int = 1, count: int = 2
    ) -> list[torch.Tensor]:
        """``count`` buffers of (layers, 2, num_blocks, *block_shape)."""
        shape = (layers, 2, num_blocks, *layout.block_shape)
        numel = layers * 2 * num_blocks * layout.block_bytes // layout.dtype.itemsize
        fits = (
            len(self._flat) >= count
            and self._flat[0].dtype == layout.dtype
            and self._flat[0].device == layout.device
            and self._flat[0].numel() >= numel
        )
        if not fits:
            self._flat = [
                torch.empty(numel, dtype=layout.dtype, device=layout.device) for _ in range(count)
            ]
        return [f[:numel].view(shape) for f in self._flat[:count]]

    def release(self) -> None:
        self._flat = []


class ByteBuffer:
    """One reusable uint8 buffer, grown to the largest size asked and kept until
    ``release`` (the opening messages of one peer)."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._flat: torch.Tensor | None = None

    def get(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the buffer (8-byte aligned: any dtype may view it)."""
        if self._flat is None or self._flat.numel() < nbytes:
            self._flat = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        return self._flat[:nbytes]

    def release(self) -> None:
        self._flat = None

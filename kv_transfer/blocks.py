"""Copying one request's blocks between a paged cache and a message buffer.

A message holds ``count`` consecutive layers as (count, 2, n, *block_shape): per layer, K's
n blocks then V's, in block-table order. When every layer's K and V are views into one
pool at regular offsets (``KVCache.data``, the usual case) the whole message moves in a
single ``gather_blocks``/``scatter_blocks`` call over the pool seen as a flat array of
blocks; otherwise one call per layer and per K/V. Either way the bytes are moved as int32
words where the block allows it: a bit copy, and torch's CPU ``index_copy_`` runs about
twice as fast on 4-byte integers as on bf16/fp16.
"""

from __future__ import annotations

import itertools
import math

import torch

from disagg_kernels import gather_blocks, scatter_blocks
from kv_transfer.layout import KVLayers, KVLayout


def as_words(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as int32 when its last dimension allows it, else ``t`` itself."""
    if t.dtype.itemsize <= 4 and t.shape[-1] * t.dtype.itemsize % 4 == 0 and t.stride(-1) == 1:
        return t.view(torch.int32)
    return t


def pool_view(kv_layers: KVLayers, layout: KVLayout) -> tuple[torch.Tensor, list[int]] | None:
    """``(flat, bases)`` when all caches sit in one allocation at block-aligned, disjoint
    offsets: ``flat`` is (R, *block_shape) over that memory and ``bases[2 * i + kv]`` is
    the flat index of block 0 of layer i's K (kv=0) or V (kv=1). None otherwise."""
    k0 = kv_layers[0][0]
    block_bytes = layout.block_bytes
    bases: list[int] = []
    for pair in kv_layers:
        for t in pair:
            offset = t.data_ptr() - k0.data_ptr()
            if offset < 0 or offset % block_bytes or not t.is_contiguous():
                return None
            bases.append(offset // block_bytes)
    ordered = sorted(bases)
    if any(b - a < layout.pool_blocks for a, b in itertools.pairwise(ordered)):
        return None  # overlapping caches: keep to per-layer copies
    rows = ordered[-1] + layout.pool_blocks
    block_strides = k0.stride()[1:]
    try:  # checks that all rows lie in k0's storage, hence that it is one allocation
        flat = k0.as_strided(
            (rows, *layout.block_shape), (math.prod(layout.block_shape), *block_strides)
        )
    except RuntimeError:
        return None
    return flat, bases


class BlockMover:
    """Gathers and scatters messages of consecutive layers for one request's block ids."""

    def __init__(self, kv_layers: KVLayers, layout: KVLayout, ids: torch.Tensor) -> None:
        self._layers = kv_layers
        self._layout = layout
        self._ids = ids
        view = pool_view(kv_layers, layout)
        self._flat: torch.Tensor | None = None
        if view is not None:
            flat, bases = view
            self._flat = as_words(flat)
            base = torch.tensor(bases, dtype=torch.int64, device=ids.device)
            # (layers * 2 * n,): flat index of every (layer, K/V, block) in message order.
            self._flat_ids = (base[:, None] + ids[None, :]).reshape(-1)
        self._per_layer = 2 * len(ids)

    def gather(self, first: int, out: torch.Tensor) -> None:
        """out (count, 2, n, *block_shape) <- layers first .. first + count - 1."""
        count = out.shape[0]
        if self._flat is not None:
            ids = self._flat_ids[first * self._per_layer : (first + count) * self._per_layer]
            gather_blocks(self._flat, ids, out=as_words(out.view(-1, *self._layout.block_shape)))
            return
        for j in range(count):
            k, v = self._layers[first + j]
            gather_blocks(as_words(k), self._ids, out=as_words(out[j, 0]))
            gather_blocks(as_words(v), self._ids, out=as_words(out[j, 1]))

    def scatter(self, src: torch.Tensor, first: int) -> None:
        """Layers first .. first + count - 1 <- src (count, 2, n, *block_shape)."""
        count = src.shape[0]
        if self._flat is not None:
            ids = self._flat_ids[first * self._per_layer : (first + count) * self._per_layer]
            scatter_blocks(as_words(src.view(-1, *self._layout.block_shape)), self._flat, ids)
            return
        for j in range(count):
            k, v = self._layers[first + j]
            scatter_blocks(as_words(src[j, 0]), as_words(k), self._ids)
            scatter_blocks(as_words(src[j, 1]), as_words(v), self._ids)

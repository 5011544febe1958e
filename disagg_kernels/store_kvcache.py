"""Write the new tokens' keys and values into the paged KV cache.

Cache layout: (num_blocks, block_size, H_kv, D). Token ``i`` goes to slot
``slot_mapping[i] = block_id * block_size + offset``; slot -1 skips the row, so padded
batches need no compaction.
"""

from __future__ import annotations

import torch

from disagg_kernels._triton import HAS_TRITON, next_power_of_2, tl, triton
from disagg_kernels.backend import resolve


def _check(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    assert key.dim() == 3 and key.shape == value.shape, (key.shape, value.shape)
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.shape[2:] == key.shape[1:], (k_cache.shape, key.shape)
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
    assert slot_mapping.shape == (key.shape[0],), (slot_mapping.shape, key.shape)
    assert slot_mapping.dtype in (torch.int32, torch.int64), slot_mapping.dtype


def store_kvcache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _check(key, value, k_cache, v_cache, slot_mapping)
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # (N,)
    slots = slot_mapping[keep].long()  # (n,)
    blocks, offsets = slots // block_size, slots % block_size  # (n,), (n,)
    k_cache[blocks, offsets] = key[keep]  # (n, H_kv, D)
    v_cache[blocks, offsets] = value[keep]  # (n, H_kv, D)


if HAS_TRITON:

    @triton.jit
    def _store_kvcache_kernel(
        key_ptr,
        value_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_ptr,
        key_stride,
        value_stride,
        cache_block_stride,
        cache_slot_stride,
        block_size,
        row_numel,
        BLOCK: tl.constexpr,
    ):
        # One program per token: copy its (H_kv * D) contiguous elements for K and V.
        row = tl.program_id(0)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        if slot >= 0:
            dst = (slot // block_size) * cache_block_stride + (
                slot % block_size
            ) * cache_slot_stride
            offs = tl.arange(0, BLOCK)
            mask = offs < row_numel
            k = tl.load(key_ptr + row * key_stride + offs, mask=mask)
            v = tl.load(value_ptr + row * value_stride + offs, mask=mask)
            tl.store(k_cache_ptr + dst + offs, k, mask=mask)
            tl.store(v_cache_ptr + dst + offs, v, mask=mask)


def store_kvcache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _check(key, value, k_cache, v_cache, slot_mapping)
    n, h_kv, d = key.shape
    # The kernel treats each token's (H_kv, D) as one flat run, in the inputs and the cache.
    assert key.stride()[1:] == (d, 1) and value.stride()[1:] == (d, 1)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride()[2:] == (d, 1)
    assert slot_mapping.is_contiguous()
    if n == 0:
        return
    _store_kvcache_kernel[(n,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.shape[1],
        h_kv * d,
        BLOCK=next_power_of_2(h_kv * d),
    )


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """In place: ``k_cache``/``v_cache`` at ``slot_mapping[i]`` := ``key[i]``/``value[i]``.

    key, value: (N, H_kv, D); k_cache, v_cache: (num_blocks, block_size, H_kv, D), same
    dtype; slot_mapping: (N,) int32/int64, -1 = skip the row.
    """
    if resolve(key) == "triton":
        store_kvcache_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kvcache_torch(key, value, k_cache, v_cache, slot_mapping)

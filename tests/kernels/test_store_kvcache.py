from __future__ import annotations

import pytest
import torch

from disagg_kernels import kernel_backend, store_kvcache
from disagg_kernels.store_kvcache import store_kvcache_torch
from tests.kernels._reference import DEVICE, TRITON_RUNNABLE, naive_store

needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton cannot run here")

NUM_BLOCKS, BLOCK_SIZE = 6, 4


def _inputs(n: int, h_kv: int, d: int, dtype: torch.dtype, slot_dtype: torch.dtype):
    """Random rows; every third row is padding (slot -1), the rest go to shuffled slots."""
    key = torch.randn(n, h_kv, d, device=DEVICE).to(dtype)
    value = torch.randn(n, h_kv, d, device=DEVICE).to(dtype)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE)[:n]
    slots[::3] = -1
    k_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, h_kv, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, h_kv, d, device=DEVICE).to(dtype)
    return key, value, k_cache, v_cache, slots.to(device=DEVICE, dtype=slot_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(("n", "h_kv", "d"), [(1, 1, 32), (7, 2, 64), (13, 4, 32)])
def test_torch_matches_naive(dtype, slot_dtype, n, h_kv, d) -> None:
    torch.manual_seed(n)
    key, value, k_cache, v_cache, slots = _inputs(n, h_kv, d, dtype, slot_dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    naive_store(key, value, k_want, v_want, slots)
    store_kvcache_torch(key, value, k_cache, v_cache, slots)
    # A copy is exact; untouched slots (including those skipped by -1) keep their values.
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(("n", "h_kv", "d"), [(1, 1, 32), (9, 2, 64), (13, 3, 32)])
def test_triton_matches_torch(dtype, slot_dtype, n, h_kv, d) -> None:
    torch.manual_seed(n)
    key, value, k_cache, v_cache, slots = _inputs(n, h_kv, d, dtype, slot_dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    store_kvcache_torch(key, value, k_want, v_want, slots)
    with kernel_backend("triton"):
        store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


@needs_triton
def test_triton_reads_strided_rows_of_a_fused_qkv() -> None:
    """Key/value sliced from a fused (N, 3, H, D) projection: rows are not contiguous."""
    torch.manual_seed(0)
    qkv = torch.randn(5, 3, 2, 32, device=DEVICE)
    key, value = qkv[:, 1], qkv[:, 2]  # (N, H_kv, D), row stride 3 * H * D
    slots = torch.tensor([3, -1, 0, 22, 9], device=DEVICE)
    k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, 2, 32, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    naive_store(key, value, k_want, v_want, slots)
    with kernel_backend("triton"):
        store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def test_all_padding_leaves_cache_untouched() -> None:
    key, value, k_cache, v_cache, _ = _inputs(4, 2, 32, torch.float32, torch.int64)
    before = k_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, torch.full((4,), -1, device=DEVICE))
    assert torch.equal(k_cache, before)

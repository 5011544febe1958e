from __future__ import annotations

import pytest
import torch

from disagg_kernels import gather_blocks, kernel_backend, scatter_blocks
from disagg_kernels.block_copy import gather_blocks_torch, scatter_blocks_torch
from tests.kernels._reference import DEVICE, TRITON_RUNNABLE

needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton cannot run here")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]
# (block_size, H_kv, D) as in the KV cache, and an odd trailing shape.
BLOCK_SHAPES = [(4, 2, 32), (3, 5)]


def _cache(num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(num_blocks, *block_shape, device=DEVICE) * 50).to(dtype)


def _ids(ids: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(ids, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("block_shape", BLOCK_SHAPES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_torch_gather_and_scatter_match_naive_loops(block_shape, ids_dtype) -> None:
    torch.manual_seed(0)
    cache = _cache(10, block_shape, torch.float32)
    ids = [7, 2, 9, 3]
    got = gather_blocks_torch(cache, _ids(ids, ids_dtype))
    assert got.is_contiguous()
    for i, block in enumerate(ids):
        assert torch.equal(got[i], cache[block])

    target = torch.zeros_like(cache)
    scatter_blocks_torch(got, target, _ids([0, 5, 1, 8], ids_dtype))
    for i, block in enumerate([0, 5, 1, 8]):
        assert torch.equal(target[block], got[i])
    untouched = [b for b in range(10) if b not in (0, 5, 1, 8)]
    assert not target[untouched].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_shape", BLOCK_SHAPES)
def test_gather_matches_torch(backend, dtype, block_shape) -> None:
    torch.manual_seed(1)
    cache = _cache(10, block_shape, dtype)
    ids = _ids([7, 2, 9, 3], torch.int32)  # not contiguous, not sorted
    want = gather_blocks_torch(cache, ids)
    out = torch.empty_like(want)
    with kernel_backend(backend):
        got = gather_blocks(cache, ids, out=out)
    assert got is out and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_into_another_cache(backend, dtype) -> None:
    """Gather from one cache, scatter into another at different ids: as a disagg transfer."""
    torch.manual_seed(2)
    src_cache = _cache(12, (4, 2, 32), dtype)
    dst_cache = _cache(9, (4, 2, 32), dtype)
    src_ids, dst_ids = _ids([11, 0, 5, 6, 2]), _ids([3, 8, 0, 4, 1])
    want = dst_cache.clone()
    want[dst_ids] = src_cache[src_ids]
    with kernel_backend(backend):
        staged = gather_blocks(src_cache, src_ids)
        scatter_blocks(staged, dst_cache, dst_ids)
    assert torch.equal(dst_cache, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_of_a_layer_slice(backend) -> None:
    """A per-layer view of a (num_blocks, 2, ...) K/V cache: blocks are contiguous runs but
    consecutive blocks are two blocks apart."""
    torch.manual_seed(3)
    kv = _cache(6, (2, 4, 2, 32), torch.float32)
    v_cache = kv[:, 1]  # (num_blocks, 4, 2, 32), stride(0) = 2 * block numel
    ids = _ids([5, 1])
    k_before = kv[:, 0].clone()
    with kernel_backend(backend):
        staged = gather_blocks(v_cache, ids)
        assert torch.equal(staged, v_cache[ids])
        scatter_blocks(staged.flip(0), v_cache, ids)
    assert torch.equal(v_cache[ids], staged.flip(0))
    assert torch.equal(kv[:, 0], k_before)  # the interleaved K blocks are untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_id_list_is_a_no_op(backend) -> None:
    cache = _cache(3, (4, 2, 32), torch.float32)
    before = cache.clone()
    with kernel_backend(backend):
        assert gather_blocks(cache, _ids([])).shape == (0, 4, 2, 32)
        scatter_blocks(cache[:0], cache, _ids([]))
    assert torch.equal(cache, before)

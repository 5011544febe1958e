from __future__ import annotations

import pytest
import torch

from disagg_kernels import kernel_backend, paged_decode_attention
from disagg_kernels.paged_attention import (
    paged_decode_attention_torch,
    paged_decode_attention_triton,
)
from tests.kernels._reference import (
    DEVICE,
    TOL,
    TRITON_RUNNABLE,
    make_paged_kv,
    naive_attention,
)

needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton cannot run here")
# Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as raw uint16 bits.
bf16_needs_gpu = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="interpreter tl.dot is wrong for bfloat16"
)

# Lengths at, one before and one past block boundaries (block_size 4 and 16), odd ones, 1.
LENGTHS = {4: [1, 4, 5, 7, 8, 9, 13], 16: [1, 15, 16, 17, 33]}


def _case(lengths, block_size, group, h_kv, d, dtype, pad_entry):
    k_cache, v_cache, tables, lens, keys, values = make_paged_kv(
        lengths, block_size, h_kv, d, dtype, pad_entry
    )
    query = torch.randn(len(lengths), h_kv * group, d, device=DEVICE).to(dtype)  # (B, H_q, D)
    return query, k_cache, v_cache, tables, lens, keys, values


def _naive(query, keys, values, scale):
    # The new token is the last one in the context: it sees every cached key.
    return torch.stack(
        [
            naive_attention(q[None], k, v, scale, causal=False)[0]
            for q, k, v in zip(query, keys, values, strict=True)
        ]
    )  # (B, H_q, D)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"]
)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("block_size", [4, 16])
def test_torch_matches_naive(dtype, group, d, block_size) -> None:
    torch.manual_seed(group * d + block_size)
    pad_entry = -1 if group != 2 else 10**6  # padding may be -1 or out-of-range garbage
    query, k_cache, v_cache, tables, lens, keys, values = _case(
        LENGTHS[block_size], block_size, group, 2, d, dtype, pad_entry
    )
    scale = d**-0.5
    out = paged_decode_attention_torch(query, k_cache, v_cache, tables, lens, scale)
    assert out.shape == query.shape and out.dtype == dtype
    torch.testing.assert_close(
        out.double().cpu(), _naive(query, keys, values, scale), atol=TOL[dtype], rtol=0
    )


@needs_triton
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_gpu)],
    ids=["f32", "f16", "bf16"],
)
@pytest.mark.parametrize(("group", "h_kv"), [(1, 2), (2, 1), (4, 2)])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("block_size", [4, 16])
def test_triton_matches_torch(dtype, group, h_kv, d, block_size) -> None:
    torch.manual_seed(group * d + block_size)
    query, k_cache, v_cache, tables, lens, _, _ = _case(
        LENGTHS[block_size], block_size, group, h_kv, d, dtype, pad_entry=-1
    )
    want = paged_decode_attention_torch(query, k_cache, v_cache, tables, lens, 0.125)
    with kernel_backend("triton"):
        got = paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=0)


@needs_triton
def test_triton_tile_smaller_than_cache_block() -> None:
    """BLOCK_N=16 over 32-token cache blocks, with garbage padding entries in the table."""
    torch.manual_seed(1)
    query, k_cache, v_cache, tables, lens, keys, values = _case(
        [31, 32, 33], 32, 2, 2, 32, torch.float32, pad_entry=10**6
    )
    got = paged_decode_attention_triton(query, k_cache, v_cache, tables, lens, 0.2, block_n=16)
    torch.testing.assert_close(
        got.double().cpu(), _naive(query, keys, values, 0.2), atol=TOL[torch.float32], rtol=0
    )


def test_empty_context_is_rejected() -> None:
    query, k_cache, v_cache, tables, _, _, _ = _case([3, 2], 4, 1, 1, 32, torch.float32, -1)
    lens = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="at least one token"):
        paged_decode_attention_torch(query, k_cache, v_cache, tables, lens, 0.2)


@pytest.mark.parametrize("fill", [float("nan"), 1e4], ids=["nan", "finite-garbage"])
def test_torch_grouped_batch_matches_naive(fill) -> None:
    """More sequences than one length group (16), in shuffled lengths, with stale slots
    that are NaN (the zeroing fallback) or large finite garbage (the fast path)."""
    torch.manual_seed(7)
    lengths = [int(n) for n in torch.randint(1, 70, (37,))]
    k_cache, v_cache, tables, lens, keys, values = make_paged_kv(
        lengths, 16, 2, 32, torch.float32, pad_entry=0, fill=fill
    )
    query = torch.randn(len(lengths), 8, 32, device=DEVICE)
    out = paged_decode_attention_torch(query, k_cache, v_cache, tables, lens, 32**-0.5)
    torch.testing.assert_close(
        out.double().cpu(), _naive(query, keys, values, 32**-0.5), atol=TOL[torch.float32], rtol=0
    )


@needs_triton
@pytest.mark.parametrize(
    ("dtype", "splits"), [(torch.float32, 2), (torch.float32, 5), (torch.float16, 3)]
)
def test_split_context_matches_naive(dtype, splits) -> None:
    """Split-K: each context cut into ``splits`` parts merged by log-sum-exp; contexts
    shorter than a split leave later splits empty (they must weigh nothing), and NaN in
    the slots past each context must not leak through any split."""
    torch.manual_seed(splits)
    query, k_cache, v_cache, tables, lens, keys, values = _case(
        [1, 9, 70], 16, 2, 2, 32, dtype, pad_entry=-1
    )
    got = paged_decode_attention_triton(
        query, k_cache, v_cache, tables, lens, 0.2, block_n=16, num_splits=splits
    )
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.double().cpu(), _naive(query, keys, values, 0.2), atol=TOL[dtype], rtol=0
    )


def test_contexts_split_only_when_the_batch_leaves_sms_idle() -> None:
    from disagg_kernels.paged_attention import MAX_SPLITS, decode_splits

    assert decode_splits(programs=8, max_tokens=32768, sm_count=132) == MAX_SPLITS
    assert decode_splits(programs=8, max_tokens=1024, sm_count=132) == 2  # >= 512 tokens each
    assert decode_splits(programs=64, max_tokens=32768, sm_count=132) == 5
    assert decode_splits(programs=512, max_tokens=32768, sm_count=132) == 1  # SMs busy
    assert decode_splits(programs=1, max_tokens=300, sm_count=132) == 1  # too short to split

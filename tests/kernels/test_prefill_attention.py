from __future__ import annotations

import itertools

import pytest
import torch

from disagg_kernels import kernel_backend, prefill_attention
from disagg_kernels.prefill_attention import prefill_attention_torch, prefill_attention_triton
from tests.kernels._reference import DEVICE, TOL, TRITON_RUNNABLE, cu_seqlens_of, naive_attention

needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton cannot run here")
# Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as raw uint16 bits.
bf16_needs_gpu = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="interpreter tl.dot is wrong for bfloat16"
)


def _case(lengths: list[int], group: int, h_kv: int, d: int, dtype: torch.dtype):
    t = sum(lengths)
    query = torch.randn(t, h_kv * group, d, device=DEVICE).to(dtype)  # (T, H_q, D)
    key = torch.randn(t, h_kv, d, device=DEVICE).to(dtype)  # (T, H_kv, D)
    value = torch.randn(t, h_kv, d, device=DEVICE).to(dtype)  # (T, H_kv, D)
    return query, key, value, cu_seqlens_of(lengths)


def _naive(query, key, value, cu_seqlens, scale):
    bounds = cu_seqlens.tolist()
    parts = [
        naive_attention(query[a:b], key[a:b], value[a:b], scale, causal=True)
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(parts)  # (T, H_q, D)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"]
)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("d", [32, 64])
def test_torch_matches_naive(dtype, group, d) -> None:
    torch.manual_seed(group + d)
    lengths = [5, 1, 0, 9]  # includes an empty sequence
    query, key, value, cu = _case(lengths, group, 2, d, dtype)
    out = prefill_attention_torch(query, key, value, cu, max(lengths), d**-0.5)
    assert out.shape == query.shape and out.dtype == dtype
    torch.testing.assert_close(
        out.double().cpu(), _naive(query, key, value, cu, d**-0.5), atol=TOL[dtype], rtol=0
    )


@needs_triton
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_gpu)],
    ids=["f32", "f16", "bf16"],
)
@pytest.mark.parametrize(("group", "h_kv"), [(1, 2), (2, 1), (4, 1)])
@pytest.mark.parametrize("d", [32, 64])
def test_triton_matches_torch(dtype, group, h_kv, d) -> None:
    torch.manual_seed(group + d)
    # With BLOCK_M = BLOCK_N = 16: lengths at, one before and one past tile boundaries.
    lengths = [1, 16, 0, 17, 15, 33]
    query, key, value, cu = _case(lengths, group, h_kv, d, dtype)
    want = prefill_attention_torch(query, key, value, cu, max(lengths), 0.15)
    got = prefill_attention_triton(
        query, key, value, cu, max(lengths), 0.15, block_m=16, block_n=16
    )
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=0)


@needs_triton
def test_triton_default_tiles_via_dispatcher_against_naive() -> None:
    torch.manual_seed(0)
    lengths = [32, 7, 33]
    query, key, value, cu = _case(lengths, 2, 2, 32, torch.float32)
    with kernel_backend("triton"):
        got = prefill_attention(query, key, value, cu, max(lengths), 0.2)
    want = _naive(query, key, value, cu, 0.2)
    torch.testing.assert_close(got.double().cpu(), want, atol=TOL[torch.float32], rtol=0)


@needs_triton
def test_triton_grid_larger_than_needed() -> None:
    """An over-estimated max_seqlen only adds programs that exit at once."""
    torch.manual_seed(0)
    query, key, value, cu = _case([3, 5], 1, 1, 32, torch.float32)
    want = prefill_attention_torch(query, key, value, cu, 5, 0.2)
    got = prefill_attention_triton(query, key, value, cu, 64, 0.2, block_m=16, block_n=16)
    torch.testing.assert_close(got, want, atol=TOL[torch.float32], rtol=0)

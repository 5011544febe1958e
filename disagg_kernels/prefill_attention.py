"""Causal attention over packed variable-length sequences (prefill, no padding).

Sequence ``b`` occupies rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of query/key/value and
attends causally within itself only. Query head ``h`` uses KV head ``h // (H_q // H_kv)``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from disagg_kernels._triton import HAS_TRITON, dot_precision, next_power_of_2, tl, triton
from disagg_kernels.backend import resolve


def _check(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor
) -> None:
    assert query.dim() == 3 and key.shape == value.shape, (query.shape, key.shape)
    t, h_q, d = query.shape
    assert key.shape[0] == t and key.shape[2] == d, (query.shape, key.shape)
    assert h_q % key.shape[1] == 0, (query.shape, key.shape)
    assert query.dtype == key.dtype == value.dtype
    assert cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32, cu_seqlens


def prefill_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    _check(query, key, value, cu_seqlens)
    out = torch.empty_like(query)  # (T, H_q, D)
    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0], (bounds, query.shape)
    for start, end in itertools.pairwise(bounds):
        if start == end:
            continue
        assert end - start <= max_seqlen, (start, end, max_seqlen)
        # 4-D inputs: with 3-D ones CPU SDPA falls back to its slow math path.
        out[start:end] = F.scaled_dot_product_attention(
            query[None, start:end].transpose(1, 2),  # (1, H_q, L, D)
            key[None, start:end].transpose(1, 2),  # (1, H_kv, L, D)
            value[None, start:end].transpose(1, 2),  # (1, H_kv, L, D)
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )[0].transpose(0, 1)  # (L, H_q, D)
    return out


if HAS_TRITON:

    @triton.jit
    def _prefill_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cu_ptr,
        out_ptr,
        q_stride_t,
        q_stride_h,
        kv_stride_t,
        kv_stride_h,
        out_stride_t,
        out_stride_h,
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        head_dim,
        GROUP: tl.constexpr,  # query heads per KV head
        BLOCK_M: tl.constexpr,  # query rows per program
        BLOCK_N: tl.constexpr,  # key rows per iteration
        BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
        PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32
    ):
        # One program per (query block, sequence, query head); the grid is sized for the
        # longest sequence, so blocks past a shorter sequence's end exit at once.
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        start = tl.load(cu_ptr + seq)
        seq_len = tl.load(cu_ptr + seq + 1) - start
        if m_block * BLOCK_M >= seq_len:
            return

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # positions within the sequence
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < seq_len
        d_mask = offs_d < head_dim
        rows = (start + offs_m).to(tl.int64)  # (BLOCK_M,) packed row indices
        q = tl.load(
            q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        kv_head_off = (head // GROUP) * kv_stride_h

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Causal: keys past this block's last query row are never needed.
        hi = tl.minimum(seq_len, (m_block + 1) * BLOCK_M)
        for k_start in range(0, hi, BLOCK_N):
            pos = k_start + offs_n  # (BLOCK_N,)
            n_mask = pos < seq_len
            kv_rows = (start + pos).to(tl.int64)
            kv_off = kv_rows[:, None] * kv_stride_t + kv_head_off + offs_d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)

            s = (
                tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            )  # (BLOCK_M, BLOCK_N) float32
            # Applied on every tile for simplicity; only diagonal tiles really need it.
            causal = (pos[None, :] <= offs_m[:, None]) & n_mask[None, :]
            s = tl.where(causal, s, float("-inf"))
            # Every row sees key 0 in the first tile, so m_new is finite from then on.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            out_ptr + rows[:, None] * out_stride_t + head * out_stride_h + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def prefill_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    _check(query, key, value, cu_seqlens)
    t, h_q, d = query.shape
    assert query.stride(2) == 1 and key.stride(2) == 1
    assert key.stride() == value.stride() and cu_seqlens.is_contiguous()
    out = torch.empty_like(query)  # (T, H_q, D)
    n_seqs = cu_seqlens.shape[0] - 1
    if t == 0 or n_seqs == 0:
        return out
    grid = (triton.cdiv(max_seqlen, block_m), n_seqs, h_q)
    _prefill_kernel[grid](
        query,
        key,
        value,
        cu_seqlens,
        out,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        out.stride(0),
        out.stride(1),
        scale * 1.4426950408889634,  # log2(e)
        d,
        GROUP=h_q // key.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(d)),
        PRECISION=dot_precision(query.dtype),
    )
    return out


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention within each packed sequence.

    query: (T, H_q, D); key, value: (T, H_kv, D); cu_seqlens: (B + 1,) int32 cumulative
    lengths from 0; max_seqlen: the longest sequence (sizes the Triton grid without a
    host sync). Returns (T, H_q, D) in query's dtype.
    """
    if resolve(query) == "triton":
        return prefill_attention_triton(query, key, value, cu_seqlens, max_seqlen, scale)
    return prefill_attention_torch(query, key, value, cu_seqlens, max_seqlen, scale)

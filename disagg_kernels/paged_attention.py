"""Decode attention: one new query token per sequence against its paged KV cache.

Cache layout: (num_blocks, block_size, H_kv, D). ``block_tables[b, j]`` is the cache block
holding tokens ``[j * block_size, (j + 1) * block_size)`` of sequence ``b``; entries past
the sequence's last block are padding and are never read. Query head ``h`` attends with
KV head ``h // (H_q // H_kv)`` (grouped-query attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disagg_kernels._triton import HAS_TRITON, dot_precision, next_power_of_2, tl, triton
from disagg_kernels.backend import resolve


def _check(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    assert query.dim() == 3 and k_cache.dim() == 4, (query.shape, k_cache.shape)
    assert k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    b, h_q, d = query.shape
    h_kv = k_cache.shape[2]
    assert k_cache.shape[3] == d and h_q % h_kv == 0, (query.shape, k_cache.shape)
    assert query.dtype == k_cache.dtype == v_cache.dtype
    assert block_tables.dim() == 2 and block_tables.shape[0] == b, block_tables.shape
    assert context_lens.shape == (b,), context_lens.shape
    assert block_tables.dtype == context_lens.dtype == torch.int32


# Sequences are attended in groups of this many, sorted by length, so each group is
# padded only to its own longest context (on CPU this halves the work of a mixed batch).
TORCH_GROUP_SIZE = 16


def paged_decode_attention_torch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    _check(query, k_cache, v_cache, block_tables, context_lens)
    b = query.shape[0]
    if b == 0:
        return torch.empty_like(query)
    assert int(context_lens.min()) > 0, "every sequence needs at least one token"
    if b <= TORCH_GROUP_SIZE:
        return _attend_group(query, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(query)
    order = torch.argsort(context_lens, descending=True)
    for start in range(0, b, TORCH_GROUP_SIZE):
        rows = order[start : start + TORCH_GROUP_SIZE]
        out[rows] = _attend_group(
            query[rows], k_cache, v_cache, block_tables[rows], context_lens[rows], scale
        )
    return out


def _attend_group(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    b, _h_q, d = query.shape
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    max_len = int(context_lens.max())
    n_blocks = (max_len + block_size - 1) // block_size
    assert n_blocks <= block_tables.shape[1], (max_len, block_tables.shape)

    # Padding entries may hold any value: point them at block 0 so the gather stays in
    # bounds; the positions they cover are masked out below.
    first_pos = torch.arange(n_blocks, device=query.device) * block_size  # (n_blocks,)
    used = first_pos[None, :] < context_lens[:, None]  # (B, n_blocks)
    tables = torch.where(used, block_tables[:, :n_blocks], 0).long()  # (B, n_blocks)

    seq_len = n_blocks * block_size
    pos = torch.arange(seq_len, device=query.device)  # (L,)
    mask = pos[None, :] < context_lens[:, None]  # (B, L)
    flat = tables.flatten()  # index_select copies whole blocks, ~4x faster than cache[tables]
    k = k_cache.index_select(0, flat).view(b, seq_len, h_kv, d)  # (B, L, H_kv, D)
    v = v_cache.index_select(0, flat).view(b, seq_len, h_kv, d)
    out = _sdpa(query, k, v, mask, scale)
    if torch.isnan(out).any():
        # Slots past the context may hold anything, and SDPA lets a NaN key or value
        # leak through a masked position (0 * NaN = NaN). That is rare (a stale block
        # of a request that overflowed), so only then pay for zeroing them.
        drop = ~mask[:, :, None, None]  # (B, L, 1, 1)
        out = _sdpa(query, k.masked_fill(drop, 0), v.masked_fill(drop, 0), mask, scale)
    return out


def _sdpa(
    query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        query.float()[:, :, None, :],  # (B, H_q, 1, D)
        k.float().transpose(1, 2),  # (B, H_kv, L, D)
        v.float().transpose(1, 2),  # (B, H_kv, L, D)
        attn_mask=mask[:, None, None, :],  # (B, 1, 1, L)
        scale=scale,
        enable_gqa=True,
    )  # (B, H_q, 1, D)
    return out[:, :, 0, :].to(query.dtype)  # (B, H_q, D)


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        tables_ptr,
        lens_ptr,
        out_ptr,
        q_stride_b,
        q_stride_h,
        cache_stride_block,
        cache_stride_slot,
        cache_stride_head,
        tables_stride_b,
        out_stride_b,
        out_stride_h,
        out_stride_split,
        lse_ptr,  # SPLIT: (B, H_q, splits) float32 log2-sum-exp of each split's scores
        split_len,  # cache tokens per split (a multiple of BLOCK_N)
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        block_size,
        head_dim,
        SPLIT: tl.constexpr,  # write each split's normalised part and its lse, not out
        GROUP: tl.constexpr,  # query heads per KV head
        BLOCK_H: tl.constexpr,  # GROUP padded to a tl.dot-friendly size (>= 16)
        BLOCK_N: tl.constexpr,  # cache tokens per iteration
        BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
        PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32
    ):
        # One program per (sequence, KV head, split of the context): every query head of
        # the group shares each K/V tile it loads, and the group forms the M dimension of
        # tl.dot. Without splitting there is one split, longer than any context.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx_len = tl.load(lens_ptr + seq)
        lo = split * split_len
        hi = tl.minimum(ctx_len, lo + split_len)

        offs_h = tl.arange(0, BLOCK_H)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        h_mask = offs_h < GROUP
        d_mask = offs_d < head_dim
        q_heads = kv_head * GROUP + offs_h  # (BLOCK_H,)

        q = tl.load(
            q_ptr + seq * q_stride_b + q_heads[:, None] * q_stride_h + offs_d[None, :],
            mask=h_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_H, BLOCK_D)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + offs_n  # (BLOCK_N,)
            n_mask = pos < hi
            # Table entries past the last block are never loaded (masked).
            block = tl.load(
                tables_ptr + seq * tables_stride_b + pos // block_size, mask=n_mask, other=0
            ).to(tl.int64)
            row = (
                block * cache_stride_block
                + (pos % block_size) * cache_stride_slot
                + kv_head * cache_stride_head
            )  # (BLOCK_N,)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)

            s = (
                tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            )  # (BLOCK_H, BLOCK_N) float32
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # Online softmax; m_new is finite because every chunk has a valid position.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        # A split past a short context saw nothing: part 0, lse -inf (it weighs nothing).
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        out_rows = out_ptr + seq * out_stride_b + split * out_stride_split
        tl.store(
            out_rows + q_heads[:, None] * out_stride_h + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=h_mask[:, None] & d_mask[None, :],
        )
        if SPLIT:
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            n_splits = tl.num_programs(2)
            tl.store(
                lse_ptr + (seq * GROUP * tl.num_programs(1) + q_heads) * n_splits + split,
                lse,
                mask=h_mask,
            )


# Split-K for long contexts at small batch: with fewer (sequence, KV head) programs than
# the GPU has SMs, each context is cut into splits of at least MIN_SPLIT_TOKENS, run by
# programs of their own, and their parts are merged by log-sum-exp weights.
MIN_SPLIT_TOKENS = 512
MAX_SPLITS = 16
# Programs one SM keeps busy (latency hiding): the batch is "small" below this many per SM.
PROGRAMS_PER_SM = 2


def decode_splits(programs: int, max_tokens: int, sm_count: int) -> int:
    """How many splits each context gets: ``programs`` (sequences x KV heads) already
    running, contexts of up to ``max_tokens`` (the block table's width: known without a
    host sync, so the choice is the same in every replay of a CUDA graph)."""
    want = -(-PROGRAMS_PER_SM * sm_count // max(programs, 1))
    return max(1, min(MAX_SPLITS, want, max_tokens // MIN_SPLIT_TOKENS))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no SMs to fill (tests pass ``num_splits``)
    return torch.cuda.get_device_properties(device).multi_processor_count


if HAS_TRITON:

    @triton.jit
    def _merge_splits_kernel(
        parts_ptr,  # (B, H_q, S, D) float32, contiguous
        lse_ptr,  # (B, H_q, S) float32
        out_ptr,
        out_stride_b,
        out_stride_h,
        num_heads,
        num_splits,
        head_dim,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (sequence, query head): its splits' parts weighted by 2^lse.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        row = seq * num_heads + head
        lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 always saw a token: finite max
        parts = tl.load(
            parts_ptr + (row * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :],
            mask=s_mask[:, None] & (offs_d[None, :] < head_dim),
            other=0.0,
        )  # (BLOCK_S, BLOCK_D)
        out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(
            out_ptr + seq * out_stride_b + head * out_stride_h + offs_d,
            out.to(out_ptr.dtype.element_ty),
            mask=offs_d < head_dim,
        )


def paged_decode_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_n: int = 32,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``num_splits``: None picks by ``decode_splits``; 1 never splits."""
    _check(query, k_cache, v_cache, block_tables, context_lens)
    b, h_q, d = query.shape
    h_kv = k_cache.shape[2]
    assert query.stride(2) == 1 and k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride()
    assert block_tables.stride(1) == 1 and context_lens.is_contiguous()
    out = torch.empty_like(query)  # (B, H_q, D)
    if b == 0:
        return out
    group = h_q // h_kv
    max_tokens = block_tables.shape[1] * k_cache.shape[1]
    splits = num_splits or decode_splits(b * h_kv, max_tokens, _sm_count(query.device))
    split_len = -(-max_tokens // splits)
    split_len = -(-split_len // block_n) * block_n  # whole iterations per split
    if splits > 1:
        parts = torch.empty(b, h_q, splits, d, dtype=torch.float32, device=query.device)
        lse = torch.empty(b, h_q, splits, dtype=torch.float32, device=query.device)
        dst, dst_strides = parts, (parts.stride(0), parts.stride(1), parts.stride(2))
    else:
        lse, dst, dst_strides = out, out, (out.stride(0), out.stride(1), 0)
    _paged_decode_kernel[(b, h_kv, splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        dst,
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        *dst_strides,
        lse,
        split_len if splits > 1 else max(max_tokens, 1),
        scale * 1.4426950408889634,  # log2(e)
        k_cache.shape[1],
        d,
        SPLIT=splits > 1,
        GROUP=group,
        BLOCK_H=max(16, next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(d)),
        PRECISION=dot_precision(query.dtype),
    )
    if splits > 1:  # one more launch: the parts merged into out
        _merge_splits_kernel[(b, h_q)](
            parts,
            lse,
            out,
            out.stride(0),
            out.stride(1),
            h_q,
            splits,
            d,
            BLOCK_S=next_power_of_2(splits),
            BLOCK_D=max(16, next_power_of_2(d)),
        )
    return out


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each sequence's newest token over its cached context.

    query: (B, H_q, D); k_cache, v_cache: (num_blocks, block_size, H_kv, D);
    block_tables: (B, max_blocks) int32; context_lens: (B,) int32, >= 1, counting the new
    token (already stored in the cache). Returns (B, H_q, D) in query's dtype; softmax and
    accumulation run in float32.
    """
    if resolve(query) == "triton":
        return paged_decode_attention_triton(
            query, k_cache, v_cache, block_tables, context_lens, scale
        )
    return paged_decode_attention_torch(query, k_cache, v_cache, block_tables, context_lens, scale)

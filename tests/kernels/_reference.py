"""Naive, obviously-correct implementations (plain loops, float64) and input builders.

The fast torch references in ``kernels`` are checked against these; the Triton kernels are
checked against the fast torch references.
"""

from __future__ import annotations

import math

import torch

from disagg_kernels._triton import HAS_TRITON, interpreter_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Under the interpreter Triton runs on CPU tensors; on a GPU it needs CUDA tensors.
TRITON_RUNNABLE = HAS_TRITON and (DEVICE.type == "cuda" or interpreter_enabled())

# Max abs error of a fast path against the float64 naive result, for outputs of size ~1:
# a few ulps of the dtype (float32 tl.dot runs in IEEE precision, not TF32, on a GPU
# too; its sums are ordered differently from the reference's, hence a little looser).
TOL = {
    torch.float32: 2e-5 if DEVICE.type == "cpu" else 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def naive_store(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots
) -> None:
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slots.tolist()):
        if slot == -1:
            continue
        k_cache[slot // block_size, slot % block_size] = key[i]
        v_cache[slot // block_size, slot % block_size] = value[i]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """q: (Lq, H_q, D); k, v: (Lk, H_kv, D), the last Lq keys aligned with the queries.

    Returns (Lq, H_q, D) float64: an explicit softmax per (query, head).
    """
    lq, h_q, d = q.shape
    lk, h_kv, _ = k.shape
    group = h_q // h_kv
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    out = torch.zeros(lq, h_q, d, dtype=torch.float64)
    for i in range(lq):
        visible = lk - lq + i + 1 if causal else lk
        for h in range(h_q):
            kv = h // group
            scores = [float(q[i, h] @ k[j, kv]) * scale for j in range(visible)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for j, w in enumerate(weights):
                out[i, h] += (w / total) * v[j, kv]
    return out


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=DEVICE)


def make_paged_kv(
    lengths: list[int],
    block_size: int,
    h_kv: int,
    d: int,
    dtype: torch.dtype,
    pad_entry: int,
    extra_columns: int = 2,
    fill: float = float("nan"),
):
    """Random per-sequence K/V written into shuffled cache blocks.

    Every cache slot not holding a context token is ``fill`` (NaN by default), and
    block-table entries past a sequence's last block hold ``pad_entry``, so reading
    anything outside the context shows up as NaN (or an index error); a large finite
    ``fill`` shows up as a wrong result instead. Returns (k_cache, v_cache, block_tables, context_lens,
    keys, values) with keys[b], values[b]: (lengths[b], H_kv, D).
    """
    per_seq = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(per_seq) + 3  # a few blocks belong to nobody
    order = torch.randperm(num_blocks).tolist()
    shape = (num_blocks, block_size, h_kv, d)
    k_cache = torch.full(shape, fill, dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, fill, dtype=dtype, device=DEVICE)
    tables = torch.full((len(lengths), max(per_seq) + extra_columns), pad_entry, dtype=torch.int32)
    keys, values = [], []
    for b, n in enumerate(lengths):
        blocks = [order.pop() for _ in range(per_seq[b])]
        tables[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, h_kv, d, device=DEVICE).to(dtype)
        v = torch.randn(n, h_kv, d, device=DEVICE).to(dtype)
        for pos in range(n):
            k_cache[blocks[pos // block_size], pos % block_size] = k[pos]
            v_cache[blocks[pos // block_size], pos % block_size] = v[pos]
        keys.append(k)
        values.append(v)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, tables.to(DEVICE), context_lens, keys, values

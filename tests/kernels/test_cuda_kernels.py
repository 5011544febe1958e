"""Triton kernels on a GPU where the CPU interpreter cannot take them: long contexts,
grouped-query attention at real head counts, every dtype (the interpreter gets bfloat16
tl.dot wrong), and block ids so high that their element offsets pass 2^31. Each is
compared with the pure-torch reference on the same inputs (the references are checked
against float64 loops on CPU). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from disagg_kernels.block_copy import gather_blocks_triton, scatter_blocks_triton
from disagg_kernels.paged_attention import (
    paged_decode_attention_torch,
    paged_decode_attention_triton,
)
from disagg_kernels.prefill_attention import prefill_attention_torch, prefill_attention_triton
from disagg_kernels.store_kvcache import store_kvcache_triton
from tests.kernels._reference import TOL

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["f32", "f16", "bf16"]
BLOCK, H_KV, D = 16, 8, 128  # a Llama-3-8B-like KV layout


def _tables(lengths: list[int], num_blocks: int, first: int = 0) -> torch.Tensor:
    """Distinct shuffled block ids from ``first`` up, per sequence; padding is -1."""
    per = [-(-n // BLOCK) for n in lengths]
    ids = (torch.randperm(num_blocks - first)[: sum(per)] + first).int()
    tables = torch.full((len(lengths), max(per)), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(per):
        tables[b, :n] = ids[at : at + n]
        at += n
    return tables.cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("group", [1, 4, 8], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("splits", [1, None], ids=["one-pass", "split-k"])
def test_paged_decode_long_contexts(dtype, group, splits):
    torch.manual_seed(group)
    lengths = [1, 17, 4097, 16384, 32768]
    pool = sum(-(-n // BLOCK) for n in lengths) + 64
    k_cache = torch.randn(pool, BLOCK, H_KV, D, device="cuda").to(dtype)
    v_cache = torch.randn(pool, BLOCK, H_KV, D, device="cuda").to(dtype)
    tables = _tables(lengths, pool)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), H_KV * group, D, device="cuda").to(dtype)
    got = paged_decode_attention_triton(
        q, k_cache, v_cache, tables, lens, D**-0.5, num_splits=splits
    )
    want = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, D**-0.5)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype], f"max error {err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_prefill_long_sequences_with_gqa(dtype):
    torch.manual_seed(0)
    lengths = [3, 1000, 8192]
    t = sum(lengths)
    q = torch.randn(t, 32, D, device="cuda").to(dtype)
    k = torch.randn(t, H_KV, D, device="cuda").to(dtype)
    v = torch.randn(t, H_KV, D, device="cuda").to(dtype)
    cu = torch.tensor([0, 3, 1003, t], dtype=torch.int32, device="cuda")
    got = prefill_attention_triton(q, k, v, cu, max(lengths), D**-0.5)
    want = prefill_attention_torch(q, k, v, cu, max(lengths), D**-0.5)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype], f"max error {err}"


@pytest.fixture(scope="module")
def huge_pool():
    """K and V caches of more than 2^31 elements each (4.3 GB each in bfloat16)."""
    per_block = BLOCK * H_KV * D
    blocks = (1 << 31) // per_block + 64
    k = torch.zeros(blocks, BLOCK, H_KV, D, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    assert k.numel() > 1 << 31
    yield k, v
    del k, v
    torch.cuda.empty_cache()


def test_block_ids_past_2_31_elements(huge_pool):
    k_cache, v_cache = huge_pool
    blocks = k_cache.shape[0]
    lengths = [40, 300]
    tables = _tables(lengths, blocks, first=blocks - 40)  # the highest blocks
    slots = torch.cat(
        [
            tables[b, torch.arange(n, device="cuda") // BLOCK].long() * BLOCK
            + torch.arange(n, device="cuda") % BLOCK
            for b, n in enumerate(lengths)
        ]
    )
    assert int(slots.min()) * H_KV * D > 1 << 31  # every offset needs 64 bits
    key = torch.randn(len(slots), H_KV, D, device="cuda").bfloat16()
    value = torch.randn_like(key)
    store_kvcache_triton(key, value, k_cache, v_cache, slots)
    k_ref, v_ref = torch.zeros_like(key), torch.zeros_like(value)
    # What the kernel wrote is where the reference reads it back from.
    k_ref.copy_(k_cache.view(-1, H_KV, D)[slots])
    v_ref.copy_(v_cache.view(-1, H_KV, D)[slots])
    assert torch.equal(k_ref, key) and torch.equal(v_ref, value)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(2, 32, D, device="cuda").bfloat16()
    got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, D**-0.5)
    want = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, D**-0.5)
    assert (got.float() - want.float()).abs().max().item() <= TOL[torch.bfloat16]
    ids = tables[1, : -(-300 // BLOCK)].long()
    staged = gather_blocks_triton(k_cache, ids)
    assert torch.equal(staged, k_cache[ids])
    scatter_blocks_triton(staged.flip(0), k_cache, ids)  # written back in reverse order
    assert torch.equal(k_cache[ids], staged.flip(0))

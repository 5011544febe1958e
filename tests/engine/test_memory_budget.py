"""The KV pool's share of a GPU (disagg/engine/kv_cache.py: MemoryBudget), as arithmetic:
only this process's memory counts against its share, the pool never takes more than is
free, and what runs after the pool is allocated keeps its room."""

from __future__ import annotations

import torch

from disagg.engine.kv_cache import (
    GRAPH_FLOOR_BYTES,
    NCCL_COMMUNICATOR_BYTES,
    STAGED_PEERS,
    KVCacheSpec,
    MemoryBudget,
    graph_pool_bytes,
    sampler_bytes,
    transfer_bytes,
)

GIB = 1 << 30


def budget(**overrides) -> MemoryBudget:
    fields = dict(
        total=80 * GIB,
        free=70 * GIB,
        utilization=0.9,
        ours=10 * GIB,  # weights + context
        activations=2 * GIB,
        graphs=1 * GIB,
        sampler=1 * GIB,
        transfers=1 * GIB,
    )
    fields.update(overrides)
    return MemoryBudget(**fields)


def test_the_pool_gets_our_share_less_what_we_hold_and_what_runs_later():
    b = budget()
    assert b.reserved == 5 * GIB
    assert b.kv_bytes == int(80 * GIB * 0.9) - 10 * GIB - 5 * GIB
    assert "KV pool" in b.describe() and "graphs 1024" in b.describe()


def test_another_process_on_the_gpu_does_not_eat_our_share():
    # A second node already took 36 GiB of the GPU: its memory is not ours, our share
    # (0.45) is still ours while it is free.
    b = budget(utilization=0.45, free=80 * GIB - 36 * GIB - 10 * GIB)
    assert b.kv_bytes == int(80 * GIB * 0.45) - 10 * GIB - 5 * GIB


def test_the_pool_never_takes_more_than_is_free():
    b = budget(free=12 * GIB)  # someone else holds most of the GPU
    assert b.kv_bytes == 12 * GIB - 5 * GIB


def test_reserves_grow_with_what_will_run():
    assert sampler_bytes(256, 128_256) == 256 * 128_256 * 28
    assert graph_pool_bytes(1, 2048, 8192, 2) > GRAPH_FLOOR_BYTES
    assert graph_pool_bytes(256, 2048, 8192, 2) > graph_pool_bytes(8, 2048, 8192, 2)
    spec = KVCacheSpec(16, 8, 64, 16, torch.bfloat16)  # a 1B model's KV
    small = transfer_bytes(spec, 16, 4, nccl=False)
    assert small == STAGED_PEERS * 4 * (1 << 20)  # a message is at least 1 MiB
    layer = 2 * 8 * 64 * 2 * 8192  # K and V of one layer for 8192 tokens
    assert transfer_bytes(spec, 8192, 4, nccl=True) == STAGED_PEERS * (
        4 * layer + NCCL_COMMUNICATOR_BYTES
    )

"""Random paged KV caches for the transfer tests (the engine's own ``KVCache`` layout)."""

from __future__ import annotations

import torch

from disagg.engine.kv_cache import KVCache, KVCacheSpec


def tiny_spec(dtype: torch.dtype = torch.float32, **overrides: int) -> KVCacheSpec:
    """The embedded tiny model's KV layout: 4 layers, 2 KV heads of 32, blocks of 16."""
    fields = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 32, "block_size": 16}
    fields.update(overrides)
    return KVCacheSpec(dtype=dtype, **fields)


def random_cache(spec: KVCacheSpec, num_blocks: int, seed: int, device: str = "cpu") -> KVCache:
    """A pool filled with seeded random values (the same seed gives the same bits in any
    process)."""
    cache = KVCache(spec, num_blocks, torch.device(device))
    g = torch.Generator().manual_seed(seed)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g, dtype=torch.float32))
    return cache


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes: equality of these is bit-exact equality (NaN and -0.0 included)."""
    return t.contiguous().view(torch.uint8)


def assert_blocks_equal(
    src: KVCache, src_ids: list[int], dst: KVCache, dst_ids: list[int], layers: range | None = None
) -> None:
    for i in layers if layers is not None else range(src.spec.num_layers):
        for kv in (0, 1):
            got = dst.data[i, kv, dst_ids]
            want = src.data[i, kv, src_ids]
            assert torch.equal(bits(got), bits(want)), f"layer {i} {'kv'[kv]} differs"


def assert_untouched(
    before: torch.Tensor, after: KVCache, except_ids: list[int] = (), layers: range | None = None
) -> None:
    """Every block of ``after`` equals ``before`` bit-exactly, except ``except_ids`` in
    ``layers`` (all blocks everywhere when ``except_ids`` is empty)."""
    keep = torch.ones(after.data.shape[:3], dtype=torch.bool, device=after.data.device)
    for i in layers if layers is not None else range(after.spec.num_layers):
        keep[i, :, list(except_ids)] = False
    assert torch.equal(bits(before[keep]), bits(after.data[keep]))


def node_layout(spec: KVCacheSpec, tp: int = 1, pp: int = 1, model: str = "tiny-test"):
    """The ``KVNodeLayout`` of a node whose whole pool has ``spec``'s shape."""
    from disagg.engine.parallel.handoff import KVNodeLayout

    return KVNodeLayout(
        model=model,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        block_size=spec.block_size,
        dtype=str(spec.dtype).removeprefix("torch."),
        tp=tp,
        pp=pp,
    )

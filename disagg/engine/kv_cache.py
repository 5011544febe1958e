"""The paged KV pool's tensors: one allocation holding every layer's K and V blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.engine.model_config import ModelConfig
from disagg.errors import ConfigError


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """A pool's shape. A rank of a parallel group holds layers
    ``[first_layer, first_layer + num_layers)`` and KV heads
    ``[first_kv_head, first_kv_head + num_kv_heads)`` of the model, in global indices."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    first_layer: int = 0
    first_kv_head: int = 0

    @classmethod
    def for_model(cls, cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype)

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    @property
    def kv_heads(self) -> range:
        return range(self.first_kv_head, self.first_kv_head + self.num_kv_heads)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def blocks_for_budget(self, budget_bytes: int) -> int:
        n = budget_bytes // self.bytes_per_block
        if n < 1:
            raise ConfigError(
                "kv_cache_memory",
                f"{budget_bytes} bytes hold no block; one block needs {self.bytes_per_block} bytes",
            )
        return n


class KVCache:
    """``data`` is (layers, 2, blocks, block_size, H_kv, D); layer i's K and V are the
    views ``data[i, 0]`` and ``data[i, 1]``, each (blocks, block_size, H_kv, D)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        self.spec = spec
        self.num_blocks = num_blocks
        self.data = torch.zeros(
            (spec.num_layers, 2, num_blocks, *spec.block_shape), dtype=spec.dtype, device=device
        )
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(spec.num_layers)]

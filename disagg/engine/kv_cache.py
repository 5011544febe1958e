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


# What a CUDA process holds outside torch's allocator: the context, cuBLAS workspaces,
# loaded Triton modules (a few hundred MiB on recent GPUs; torch cannot count them).
CUDA_CONTEXT_BYTES = 512 << 20
# NCCL's own buffers per communicator (channels x buffer size, outside torch's counters).
NCCL_COMMUNICATOR_BYTES = 256 << 20
# Peers a node keeps transfer staging for before it knows its peers (one per pair).
STAGED_PEERS = 2
# Temporaries per sampled row and vocabulary entry: float32 logits, probabilities, sorted
# values and their int64 indices (top-k/top-p), the cumulative sum, exponential noise.
SAMPLER_BYTES_PER_LOGIT = 5 * 4 + 8
# A decode graph's pool holds one step's activations at the largest bucket; this many
# hidden-sized and intermediate-sized rows per sequence bound it (qkv, attention out,
# residuals; gate/up and their product), plus a floor for workspaces.
GRAPH_HIDDEN_ROWS, GRAPH_INTERMEDIATE_ROWS, GRAPH_FLOOR_BYTES = 8, 3, 64 << 20


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """How a GPU's memory is split at start-up; ``kv_bytes`` is what the KV pool gets.

    Only this process's use counts against its share (``utilization`` of ``total``):
    another process on the GPU (a second node sharing it) has its own share. The pool
    still never takes more than is free now, less what must stay free for what will run
    after it is allocated: the largest prefill's activations, the decode graphs' pool,
    the sampler's temporaries and the KV transfers' staging and NCCL buffers."""

    total: int  # the GPU's memory
    free: int  # free now, every process counted
    utilization: float  # this process's share of ``total``
    ours: int  # this process now: torch's reserved memory and the CUDA context
    activations: int  # peak of the largest prefill (measured)
    graphs: int
    sampler: int
    transfers: int

    @property
    def reserved(self) -> int:
        return self.activations + self.graphs + self.sampler + self.transfers

    @property
    def kv_bytes(self) -> int:
        share = int(self.total * self.utilization) - self.ours - self.reserved
        return min(share, self.free - self.reserved)

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"KV pool {self.kv_bytes / mib:.0f} MiB = min({self.utilization:.2f} x "
            f"{self.total / mib:.0f} MiB - {self.ours / mib:.0f} MiB in use here, "
            f"{self.free / mib:.0f} MiB free) - activations {self.activations / mib:.0f} "
            f"- graphs {self.graphs / mib:.0f} - sampler {self.sampler / mib:.0f} "
            f"- transfers {self.transfers / mib:.0f} MiB"
        )


def sampler_bytes(max_num_seqs: int, vocab_size: int) -> int:
    return max_num_seqs * vocab_size * SAMPLER_BYTES_PER_LOGIT


def graph_pool_bytes(
    max_num_seqs: int, hidden_size: int, intermediate_size: int, itemsize: int
) -> int:
    rows = GRAPH_HIDDEN_ROWS * hidden_size + GRAPH_INTERMEDIATE_ROWS * intermediate_size
    return GRAPH_FLOOR_BYTES + max_num_seqs * rows * itemsize


def transfer_bytes(spec: KVCacheSpec, max_tokens: int, pipeline_depth: int, *, nccl: bool) -> int:
    """Staging for ``STAGED_PEERS`` peers: ``pipeline_depth`` messages each, a message
    being at least one layer of the largest transfer (``max_tokens`` tokens) or 1 MiB,
    and, over NCCL, each pair's communicator buffers."""
    blocks = -(-max_tokens // spec.block_size)
    layer = spec.bytes_per_block // spec.num_layers * blocks
    per_peer = pipeline_depth * max(layer, 1 << 20) + (NCCL_COMMUNICATOR_BYTES if nccl else 0)
    return STAGED_PEERS * per_peer

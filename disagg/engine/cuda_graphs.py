"""CUDA graphs for decode: one graph per batch-size bucket, replayed with the batch
copied into static buffers. Padding rows store nowhere (slot -1) and attend to one
token of block 0, so they cost little and change nothing."""

from __future__ import annotations

import torch

from disagg.engine.attention_metadata import AttentionMetadata
from disagg.engine.model import CausalLM, KVLayer


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and always including
    ``max_num_seqs`` (a full batch must not fall back to eager)."""
    sizes = [1, 2, 4, 8, *range(16, max_num_seqs + 1, 16), max_num_seqs]
    return sorted({s for s in sizes if s <= max_num_seqs})


class DecodeGraphs:
    def __init__(
        self, model: CausalLM, kv_layers: list[KVLayer], max_num_seqs: int, max_blocks: int
    ):
        device = kv_layers[0][0].device
        self.buckets = batch_size_buckets(max_num_seqs)
        n = self.buckets[-1]
        self.max_blocks = max_blocks
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(
            n, model.config.hidden_size, dtype=model.lm_head.weight.dtype, device=device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # steps run by a graph (tests check graphs really ran)
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            meta = AttentionMetadata(
                is_prefill=False,
                slot_mapping=self.slot_mapping[:bs],
                block_tables=self.block_tables[:bs],
                context_lens=self.context_lens[:bs],
            )

            def step(bs: int = bs, meta: AttentionMetadata = meta) -> None:
                self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], kv_layers, meta)

            with torch.inference_mode():
                step()  # warm-up: compiles kernels outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    step()
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(device)

    def fits(self, batch_size: int, num_blocks: int) -> bool:
        return batch_size <= self.buckets[-1] and num_blocks <= self.max_blocks

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        b = input_ids.shape[0]
        bucket = next(s for s in self.buckets if s >= b)
        self.input_ids[:b] = input_ids
        self.positions[:b] = positions
        self.slot_mapping[:b] = slot_mapping
        self.slot_mapping[b:bucket] = -1
        self.context_lens[:b] = context_lens
        self.context_lens[b:bucket] = 1
        self.block_tables[:b, : block_tables.shape[1]] = block_tables
        self.block_tables[b:bucket] = 0
        self.graphs[bucket].replay()
        self.replays += 1
        return self.hidden[:b]

"""Runs the model over a batch of sequences against the paged KV cache.

``prefill(seqs)`` packs every sequence's uncached tokens back to back (no padding) and
``decode(seqs)`` feeds one token per sequence; both return the logits of each sequence's
last position, (B, vocab) float32. On CUDA, decode replays CUDA graphs captured for a
ladder of batch sizes.
"""

from __future__ import annotations

import logging

import torch

from disagg.engine.attention_metadata import AttentionMetadata
from disagg.engine.cuda_graphs import DecodeGraphs
from disagg.engine.device import decode_graphs_refusal
from disagg.engine.kv_cache import KVCache
from disagg.engine.model import CausalLM
from disagg.engine.sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        *,
        max_num_seqs: int,
        max_model_len: int,
        use_cuda_graphs: bool,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.spec.block_size
        self.device = kv_cache.data.device
        self.graphs: DecodeGraphs | None = None
        refusal = decode_graphs_refusal(self.device, enforce_eager=not use_cuda_graphs)
        if refusal is None:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, kv_cache.layers, max_num_seqs, max_blocks)
        elif self.device.type == "cuda":
            log.info("decode runs eagerly on %s: %s", self.device, refusal)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        lens = [s.num_tokens for s in seqs]
        input_ids = self._tensor([t for s in seqs for t in s.token_ids], torch.long)  # (T,)
        seq_lens = self._tensor(lens, torch.long)  # (B,)
        cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=self.device)
        cu_seqlens[1:] = seq_lens.cumsum(0)
        total = sum(lens)  # known on the host: output_size spares repeat_interleave a sync
        seq_index = torch.repeat_interleave(
            torch.arange(len(seqs), device=self.device), seq_lens, output_size=total
        )  # (T,)
        positions = torch.arange(total, device=self.device) - (
            cu_seqlens[:-1].long().repeat_interleave(seq_lens, output_size=total)
        )  # (T,) position within its own sequence
        block_tables = self._block_tables(seqs)  # (B, max_blocks)
        slot_mapping = (
            block_tables[seq_index, positions // self.block_size].long() * self.block_size
            + positions % self.block_size
        )  # (T,)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=slot_mapping,
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lens),
        )
        hidden = self.model(input_ids, positions, self.kv_cache.layers, meta)  # (T, hidden)
        return self.model.compute_logits(hidden[cu_seqlens[1:].long() - 1])  # (B, vocab)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [
            s.block_table[p // self.block_size] * self.block_size + p % self.block_size
            for s, p in zip(seqs, positions, strict=True)
        ]
        input_ids = self._tensor([s.last_token_id for s in seqs], torch.long)  # (B,)
        positions_t = self._tensor(positions, torch.long)
        slot_mapping = self._tensor(slots, torch.long)
        context_lens = self._tensor([s.num_tokens for s in seqs], torch.int32)
        block_tables = self._block_tables(seqs)
        if self.graphs is not None and self.graphs.fits(len(seqs), block_tables.shape[1]):
            hidden = self.graphs.run(
                input_ids, positions_t, slot_mapping, context_lens, block_tables
            )
        else:
            meta = AttentionMetadata(
                is_prefill=False,
                slot_mapping=slot_mapping,
                block_tables=block_tables,
                context_lens=context_lens,
            )
            hidden = self.model(input_ids, positions_t, self.kv_cache.layers, meta)  # (B, hidden)
        return self.model.compute_logits(hidden)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return self._tensor(rows, torch.int32)  # (B, width); padding entries are never read

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.tensor(data, dtype=dtype)
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

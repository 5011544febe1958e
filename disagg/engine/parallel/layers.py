"""The sharding plan, applied to a :class:`CausalLM` from outside.

A rank builds the ordinary model from its *local* config (its heads, its MLP slice,
its layers: :meth:`RankShard.local_config`), so q/k/v and gate/up are already
column-parallel — each rank's fused projection computes only its own heads and
intermediate slice. :func:`shard_model` then swaps in the few modules that talk to
other ranks:

- ``o_proj`` and ``down_proj`` become :class:`RowParallelLinear` (one all-reduce each;
  a bias is added once, after the sum);
- the embedding becomes :class:`VocabParallelEmbedding` (rows outside this rank's
  vocabulary slice are zero, then an all-reduce) on the first stage, and
  :class:`StageInput` (receive the previous stage's hidden states) elsewhere;
- the LM head becomes :class:`VocabParallelHead` (each rank's logit columns, gathered
  on the driver) on the last stage; elsewhere the final norm becomes
  :class:`StageOutput` (send the hidden states on) and the head :class:`NoHead`.

The model's own ``forward`` and the runner are unchanged.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from disagg.engine.model import CausalLM
from disagg.engine.parallel.layout import RankShard


class TensorGroup:
    """The ranks of one pipeline stage. Keeps the wall time spent in all-reduce (on
    CUDA that is launch time unless the caller synchronises)."""

    def __init__(self, group: dist.ProcessGroup | None, ranks: list[int], rank: int):
        self.group = group
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = rank
        self.reduce_seconds = 0.0
        self.reduce_calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.reduce_seconds += time.perf_counter() - t0
        self.reduce_calls += 1
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, n) on every rank -> (B, size*n) on the stage's first rank, None elsewhere."""
        if self.size == 1:
            return x
        dst = self.ranks[0]
        parts = [torch.empty_like(x) for _ in self.ranks] if self.rank == dst else None
        dist.gather(x.contiguous(), parts, dst=dst, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b, with W split along its input dimension."""

    def __init__(self, linear: nn.Linear, group: TensorGroup):
        super().__init__()
        self.weight = linear.weight  # (out, in / tp)
        self.bias = linear.bias  # (out,) or None: the full bias, added once
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(F.linear(x, self.weight))  # (T, out)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """This rank's rows ``[start, start + rows)`` of the embedding (padded to the same
    row count on every rank); other ids embed to zero before the all-reduce."""

    def __init__(self, start: int, rows: int, hidden: int, group: TensorGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.start = start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start  # (T,)
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (T, hidden)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(x)


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary slice, gathered on the stage's first rank and
    cut to the real vocabulary; other ranks return an empty (B, 0) tensor."""

    def __init__(self, rows: int, hidden: int, vocab_size: int, group: TensorGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        full = self.group.gather_columns(F.linear(hidden, self.weight))  # (B, tp * rows)
        if full is None:
            return hidden.new_empty(hidden.shape[0], 0)
        return full[:, : self.vocab_size]  # (B, vocab)


class StageInput(nn.Module):
    """Stands in for the embedding on a later stage: the hidden states of the same
    tokens, received from the previous stage."""

    def __init__(self, src: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.src = src
        self.hidden = hidden
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = torch.empty(input_ids.shape[0], self.hidden, dtype=self.dtype, device=input_ids.device)
        dist.recv(x, src=self.src)  # (T, hidden)
        return x


class StageOutput(nn.Module):
    """Stands in for the final norm on an earlier stage: sends the hidden states on."""

    def __init__(self, dst: int):
        super().__init__()
        self.dst = dst

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist.send(x.contiguous(), dst=self.dst)
        return x


class NoHead(nn.Module):
    """The LM head of a stage that has none: (B, hidden) -> (B, 0)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_empty(hidden.shape[0], 0)


def shard_model(
    model: CausalLM, shard: RankShard, group: TensorGroup, *, vocab_size: int, dtype: torch.dtype
) -> None:
    """Swaps in the communicating modules (see the module docstring). ``model`` was
    built from ``shard.local_config(...)``, normally on the meta device."""
    stack = model.model
    hidden = model.config.hidden_size
    for layer in stack.layers:
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, group)
    rows = shard.vocab_padded
    if shard.is_first_stage:
        stack.embed_tokens = VocabParallelEmbedding(shard.vocab.start, rows, hidden, group)
    else:
        assert shard.prev_rank is not None
        stack.embed_tokens = StageInput(shard.prev_rank, hidden, dtype)
    if shard.is_last_stage:
        model.lm_head = VocabParallelHead(rows, hidden, vocab_size, group)
    else:
        assert shard.next_rank is not None
        stack.norm = StageOutput(shard.next_rank)
        model.lm_head = NoHead()
    tie_sharded(model, shard)


def tie_sharded(model: CausalLM, shard: RankShard) -> None:
    """The tied head shares the embedding's slice where one stage holds both (call
    again after ``to_empty``); on a last stage without the embedding the head has its
    own copy, loaded from the embedding's tensor."""
    if model.config.tie_word_embeddings and shard.is_first_stage and shard.is_last_stage:
        model.lm_head.weight = model.model.embed_tokens.weight

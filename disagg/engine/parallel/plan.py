"""The messages between a group's leader and its ranks.

The leader schedules; a rank runs exactly what a :class:`StepPlan` says. Plans carry
only what the ranks cannot know: for a prefill, each sequence's tokens and sampling
parameters; for a decode, its last token (and its parameters the first time the
sequence is named); always its length and block table. The driver keeps each
sequence's sampling state (parameters, seeded generator) from the first plan naming it
until the leader lists it in ``released``.

All messages are these slotted dataclasses of plain values, sent over the leader's
pipe to each rank; logits, when asked for, travel as raw float32 bytes (a pickled
tensor would go through torch's shared-memory reductions, which need a
multiprocessing parent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.engine.parallel.handoff import KVNodeLayout
from disagg.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq_id: int
    token_ids: tuple[int, ...]  # prefill: the whole sequence so far; decode: its last token
    num_tokens: int
    block_table: tuple[int, ...]
    # With every prefill and the first plan naming the sequence; None otherwise.
    params: SamplingParams | None = None
    # First plan naming a sequence that already has output tokens (resumed or pulled by
    # a node): the draws its seeded generator took for them, skipped on the driver so
    # the stream goes on as it would have in one process.
    skip_draws: int = 0


@dataclass(frozen=True, slots=True)
class RankKVService:
    """A node's rank moves its part of the KV pool to and from peer nodes' ranks
    (``disagg.node.rank_transfers``): the rendezvous store, the node's endpoint and KV
    layout, and the transfer settings. Commands come on a second pipe from the leader."""

    store: str
    endpoint: str
    timeout: float
    checksums: bool = False
    layout: KVNodeLayout | None = None  # filled in by the leader, which knows the model


@dataclass(frozen=True, slots=True)
class StepPlan:
    step: int
    is_prefill: bool
    seqs: tuple[ScheduledSeq, ...]
    released: tuple[int, ...] = ()  # sequences finished since the last plan
    return_logits: bool = False  # the driver returns (B, vocab) logits instead of sampling


@dataclass(frozen=True, slots=True)
class StepResult:
    """Every rank answers every plan; only the driver's answer carries tokens (or
    logits)."""

    step: int
    rank: int
    token_ids: tuple[int, ...] | None = None
    logits_bytes: bytes | None = None  # (B, vocab) float32, row-major
    vocab: int = 0

    @classmethod
    def with_logits(cls, step: int, rank: int, logits: torch.Tensor) -> StepResult:
        data = logits.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return cls(step, rank, logits_bytes=data, vocab=logits.shape[-1])

    @property
    def logits(self) -> torch.Tensor | None:
        if self.logits_bytes is None:
            return None
        flat = torch.frombuffer(bytearray(self.logits_bytes), dtype=torch.float32)
        return flat.view(-1, self.vocab)  # (B, vocab)


@dataclass(frozen=True, slots=True)
class KVShardInfo:
    """Which part of the KV cache a rank's pool holds, in global indices: its layers
    and KV heads (a replicated KV head appears on several ranks)."""

    rank: int
    stage: int
    tp_rank: int
    layers: range
    kv_heads: range


@dataclass(frozen=True, slots=True)
class RankReady:
    """Sent once the rank's shard is loaded: what it holds and how many KV blocks its
    budget allows (the leader allocates the smallest of these on every rank)."""

    rank: int
    kv: KVShardInfo
    num_parameters: int
    parameter_bytes: int
    max_blocks: int


@dataclass(frozen=True, slots=True)
class AllocateKV:
    num_blocks: int


@dataclass(frozen=True, slots=True)
class KVAllocated:
    rank: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class RankStats:
    """Answer to :class:`StatsQuery`: the all-reduce time this rank has spent so far."""

    rank: int
    reduce_seconds: float
    reduce_calls: int


@dataclass(frozen=True, slots=True)
class StatsQuery:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class RankFailure:
    """A rank's exception, as text (exception objects do not always unpickle)."""

    rank: int
    error_type: str
    message: str
    traceback: str


LeaderMessage = StepPlan | AllocateKV | StatsQuery | Shutdown
RankMessage = StepResult | RankReady | KVAllocated | RankStats | RankFailure

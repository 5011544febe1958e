"""Colocated continuous batching: each step is either a prefill batch (new prompts, under
a token budget) or a decode step over every running sequence. Prefill goes first when a
prompt fits; when decode needs a block and none is free, the policy's victim is
preempted and later recomputed from its tokens. Both are the rules every batcher shares
(:mod:`disagg.scheduling.admission`): admission in the policy's order, where a head that
does not fit blocks, and ``make_room`` for the blocks of the next decode step."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.engine.block_allocator import BlockAllocator
from disagg.engine.sequence import Sequence, SequenceStatus, blocks_for_tokens
from disagg.scheduling import SchedulingPolicy
from disagg.scheduling.admission import Limits, make_room, take_in_order


@dataclass(slots=True)
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        policy: SchedulingPolicy,
        *,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark_blocks: int = 0,
    ):
        self.allocator = allocator
        self.policy = policy
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Blocks kept free when admitting beside running sequences, so their next decode
        # steps do not preempt the newcomer at once (which would waste its prefill).
        self.watermark_blocks = watermark_blocks
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queues a new request; the policy may reject it (RequestRejectedError)."""
        self.policy.add(seq)
        seq.status = SequenceStatus.WAITING

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.policy) > 0

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        if not self.running:
            return None
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        limits = Limits(
            free=self.allocator.num_free,
            max_seqs=self.max_num_seqs,
            running=len(self.running),
            token_budget=self.max_num_batched_tokens,
            watermark=self.watermark_blocks,
        )
        admitted = take_in_order(
            self.policy, limits, self._blocks_needed, _num_tokens, on_take=self._admit
        )
        self.running.extend(admitted)
        return ScheduledBatch(is_prefill=True, seqs=admitted)

    def _blocks_needed(self, seq: Sequence) -> int:
        return blocks_for_tokens(seq.num_tokens, self.block_size)

    def _admit(self, seq: Sequence) -> None:
        seq.block_table = self.allocator.allocate(self._blocks_needed(seq))
        seq.status = SequenceStatus.RUNNING
        # Service is the prompt, charged once: recomputing a preempted request's
        # tokens is the system's cost, not the client's.
        self.policy.on_admitted(seq, seq.num_prompt_tokens if seq.num_preemptions == 0 else 0)

    def _schedule_decode(self) -> ScheduledBatch:
        scheduled, preempted = make_room(
            self.running,
            self._slot_needed,
            lambda: self.allocator.num_free,
            self.policy.preemption_victim,
            self._preempt,
            self._grant,
        )
        self.running = list(scheduled)  # finishing a sequence edits running, not the batch
        return ScheduledBatch(is_prefill=False, seqs=scheduled, preempted=preempted)

    def _slot_needed(self, seq: Sequence) -> int:
        """Blocks missing for the token at position ``num_tokens - 1`` (0 or 1)."""
        return 0 if len(seq.block_table) * self.block_size >= seq.num_tokens else 1

    def _grant(self, seq: Sequence, blocks: int) -> None:
        seq.block_table.extend(self.allocator.allocate(blocks))

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.policy.requeue(seq)

    def finish(self, seq: Sequence) -> None:
        """Releases a finished (or aborted) sequence's blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.policy.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        self.policy.on_finished(seq)


def _num_tokens(seq: Sequence) -> int:
    return seq.num_tokens

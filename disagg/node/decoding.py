"""What every node that decodes does, whatever brings its requests in (the decode node
pulls their KV or recomputes it; the colocated node prefills them): continuous batching
over the running requests, one ``StepTokens`` per step with each token's text, the
shared preemption rule when blocks run out, and a request released during a step freed
only when the step ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from disagg.engine.detokenize import TextStream
from disagg.engine.sequence import Sequence, blocks_for_tokens
from disagg.node.local_queue import CounterQueue
from disagg.node.runtime import NodeRuntime
from disagg.protocol.cluster import Ending, StepTokens, TaskFailed
from disagg.scheduling.admission import make_room, watermark


@dataclass(slots=True, eq=False)
class Decoding:
    """A request this node decodes."""

    rid: int
    client_id: str
    counter: float
    arrival: float
    seq: Sequence
    text: TextStream  # its output text, streamed from where the coordinator says it is
    released: bool = False  # released while its blocks are in use: free them after


D = TypeVar("D", bound=Decoding)


@dataclass(slots=True)
class StepBatch(Generic[D]):
    items: list[D]
    prefill: bool  # a prefill over every token it holds, or one decode step
    preempted: list[int] = field(default_factory=list)


class DecodingNode(NodeRuntime, Generic[D]):
    waiting: CounterQueue[D]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running: dict[int, D] = {}  # KV computed: decode these
        self.stepping: dict[int, D] = {}  # the batch on the model thread
        self.watermark = watermark(self.worker.num_blocks)

    def _blocks_needed(self, d: D) -> int:
        return blocks_for_tokens(d.seq.num_tokens, self.block_size)

    def _free(self, d: D) -> None:
        self.worker.allocator.free(d.seq.block_table)
        d.seq.block_table = []

    # -- steps -----------------------------------------------------------------------

    def _decode_step(self) -> StepBatch[D] | None:
        """One decode step over every running request, after making room for their next
        tokens; None when preemption left none (the preemptions are reported)."""
        preempted = self._make_room()
        if not self.running:
            self.link.send(StepTokens(preempted=preempted))
            return None
        return StepBatch(list(self.running.values()), prefill=False, preempted=preempted)

    def _stepping(self, step: StepBatch[D]) -> StepBatch[D]:
        self.stepping = {d.rid: d for d in step.items}
        return step

    def execute(self, step: StepBatch[D]) -> tuple[list[int], float]:
        seqs = [d.seq for d in step.items]
        start = time.perf_counter()
        tokens = self.worker.execute(seqs, step.prefill, self.generator)
        return tokens, time.perf_counter() - start

    def finish_step(self, step: StepBatch[D], result) -> None:
        """Reports the step's tokens (a released request's are dropped and its blocks
        freed now); a failed step fails each of its requests and frees what they held."""
        self.stepping = {}
        if isinstance(result, Exception):
            for d in step.items:
                self.running.pop(d.rid, None)
                self._forget(d)
                if not d.released:
                    self.link.send(TaskFailed(rid=d.rid, message=f"step failed: {result!r}"))
            return
        tokens, step_s = result
        rids: list[int] = []
        indices: list[int] = []
        out_tokens: list[int] = []
        texts: list[str] = []
        finished: list[Ending] = []
        for d, token in zip(step.items, tokens, strict=True):
            seq = d.seq
            if d.released:
                self._forget(d)
                continue
            seq.output_token_ids.append(token)
            reason = self.worker.finish_reason(seq, token)
            rids.append(d.rid)
            indices.append(seq.num_output_tokens - 1)
            out_tokens.append(token)
            texts.append(d.text.advance(seq.output_token_ids, reason is not None))
            if reason is None:
                self.running[d.rid] = d
            else:
                finished.append(Ending(rid=d.rid, finish_reason=reason, text_end=seq.text_end))  # type: ignore[arg-type]
                self.running.pop(d.rid, None)
                self._forget(d)
        self.link.send(
            StepTokens(
                rids=rids, indices=indices, tokens=out_tokens, texts=texts, finished=finished,
                preempted=step.preempted, step_s=step_s,
            )
        )  # fmt: skip

    def _forget(self, d: D) -> None:
        """Frees ``d``'s blocks and its sampling state: it is done here."""
        self._free(d)
        self.worker.forget(d.rid)

    # -- preemption ------------------------------------------------------------------

    def _make_room(self) -> list[int]:
        """Gives every running sequence the blocks its next token needs, preempting the
        running request of the most-served client while blocks are short (the shared
        rule, :func:`disagg.scheduling.admission.make_room`)."""
        allocator = self.worker.allocator
        order = sorted(self.running.values(), key=lambda d: (d.arrival, d.rid))
        _, evicted = make_room(
            order,
            lambda d: self._blocks_needed(d) - len(d.seq.block_table),
            lambda: allocator.num_free,
            self.waiting.preemption_victim,
            self._preempt,
            lambda d, n: d.seq.block_table.extend(allocator.allocate(n)),
        )
        return [d.rid for d in evicted]

    def _preempt(self, d: D) -> None:
        """Frees ``d``'s blocks and queues it again, to recompute its KV when readmitted
        (the coordinator charges its input once, whatever is recomputed)."""
        del self.running[d.rid]
        self._free(d)
        d.seq.num_preemptions += 1
        self.waiting.push(d)

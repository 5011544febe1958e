"""The colocated node: prefill and decode of the requests it holds on one worker, with the
engine's continuous batching (:class:`disagg.engine.scheduler.Scheduler`'s rules): each
step is a prefill batch of newly admitted requests under the token budget when the
queue's head fits, else one decode step over every running request; when decode needs
a block and none is free, the running request of the most-served client is preempted
and recomputed later from its tokens.

Requests wait in merged-counter order (:class:`~disagg.node.local_queue.CounterQueue`),
so VTC on this node is the paper's single-stage VTC: a request's input is charged to its
client's one counter when it is admitted (``Admitted``, sent before its prefill runs),
its output per token as ``StepTokens`` reports it, and the coordinator merges both into
the same per-client counters the other nodes are ordered by.

A task is a ``DecodeTask`` without a source: the prompt and the tokens already streamed
(none for a new request; some for one resumed after its node died) are prefilled here,
and the client's stream goes on from the next token index.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from disagg.engine.detokenize import TextStream
from disagg.engine.sequence import Sequence, blocks_for_tokens
from disagg.node.local_queue import CounterQueue
from disagg.node.runtime import NodeRuntime
from disagg.node.transfers import TransferDone
from disagg.protocol.cluster import (
    Admitted,
    CoordinatorToNode,
    DecodeTask,
    Ending,
    Release,
    StepTokens,
    TaskFailed,
)
from disagg.scheduling.admission import Limits, make_room, take_in_order, watermark

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Held:
    rid: int
    client_id: str
    counter: float
    arrival: float
    seq: Sequence
    text: TextStream  # its output text, streamed from where the coordinator says it is
    released: bool = False  # released during the step that holds it: free after


@dataclass(slots=True)
class ColocatedBatch:
    items: list[Held]
    prefill: bool  # a prefill batch (prompt + streamed tokens) or one decode step
    preempted: list[int] = field(default_factory=list)


class ColocatedNode(NodeRuntime):
    waiting: CounterQueue[Held]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running: dict[int, Held] = {}  # KV computed: decode these
        self.watermark = watermark(self.worker.num_blocks)
        self.stepping: dict[int, Held] = {}  # the batch on the model thread

    # -- messages --------------------------------------------------------------------

    def handle(self, msg: CoordinatorToNode) -> None:
        if isinstance(msg, DecodeTask):
            self.tasks_seen = max(self.tasks_seen, msg.task)
            if msg.source is not None:  # a coordinator bug: this node holds no peer's KV
                log.warning("request %d came with a KV source; recomputed here", msg.rid)
            seq = self.sequence(msg, msg.output_token_ids)
            text = TextStream.resume(self.worker.tokenizer, seq.output_token_ids, msg.text_chars)
            self.waiting.push(Held(msg.rid, msg.client_id, msg.counter, msg.arrival, seq, text))
        elif isinstance(msg, Release):
            self._release(msg.rid)
        else:
            log.warning("colocated node ignores %s", msg.type)

    def _release(self, rid: int) -> None:
        if self.waiting.remove(rid) is not None:
            return
        stepping = self.stepping.get(rid)
        if stepping is not None:  # its blocks are in use by the step: free them after
            stepping.released = True
            self.running.pop(rid, None)
            return
        held = self.running.pop(rid, None)
        if held is not None:
            self._free(held)
            self.worker.forget(rid)

    def on_transfer(self, done: TransferDone) -> None:
        log.warning("colocated node got a KV transfer it never asked for (%s)", done.rids)

    # -- admission and steps ---------------------------------------------------------

    def room(self) -> dict[str, int]:
        queued = sum(self._blocks_needed(h) for h in self.waiting)
        free = self.worker.allocator.num_free - queued - self.watermark
        return {
            "free_tokens": max(0, free) * self.block_size,
            "queued": len(self.waiting),
            "running": len(self.running) + len(self.stepping),
            "held": 0,
        }

    def has_work(self) -> bool:
        """Running requests to decode, or a queue head that fits now (one that does not
        fit waits for blocks: polling for it would only spin)."""
        if self.running:
            return True
        head = self.waiting.peek()
        return head is not None and self._limits().admits(
            self._blocks_needed(head), head.seq.num_tokens
        )

    def _blocks_needed(self, h: Held) -> int:
        return blocks_for_tokens(h.seq.num_tokens, self.block_size)

    def _limits(self) -> Limits:
        return Limits(
            free=self.worker.allocator.num_free,
            max_seqs=self.settings.max_num_seqs,
            running=len(self.running),
            token_budget=self.settings.max_batch_tokens,
            watermark=self.watermark,
        )

    def _admit(self) -> list[Held]:
        """The engine's prefill rule: the queue's head and those behind it while they fit
        the free blocks, the sequence limit and the batch's token budget."""
        allocator = self.worker.allocator
        taken = take_in_order(
            self.waiting, self._limits(), self._blocks_needed, lambda h: h.seq.num_tokens
        )
        for h in taken:
            h.seq.block_table = allocator.allocate(self._blocks_needed(h))
        return taken

    def prepare_step(self) -> ColocatedBatch | None:
        admitted = self._admit()
        if admitted:  # prefill first when a prompt fits, as the engine does
            self.link.send(Admitted(rids=[h.rid for h in admitted]))
            step = ColocatedBatch(admitted, prefill=True)
        elif self.running:
            preempted = self._make_room()
            step = ColocatedBatch(list(self.running.values()), prefill=False, preempted=preempted)
            if not step.items:
                self.link.send(StepTokens(preempted=preempted))
                return None
        else:
            return None
        self.stepping = {h.rid: h for h in step.items}
        return step

    def execute(self, step: ColocatedBatch) -> tuple[list[int], float]:
        seqs = [h.seq for h in step.items]
        start = time.perf_counter()
        tokens = self.worker.execute(seqs, step.prefill, self.generator)
        return tokens, time.perf_counter() - start

    def finish_step(self, step: ColocatedBatch, result) -> None:
        self.stepping = {}
        if isinstance(result, Exception):
            for h in step.items:
                self.running.pop(h.rid, None)
                self._free(h)
                self.worker.forget(h.rid)
                if not h.released:
                    self.link.send(TaskFailed(rid=h.rid, message=f"step failed: {result!r}"))
            return
        tokens, step_s = result
        rids: list[int] = []
        indices: list[int] = []
        out_tokens: list[int] = []
        texts: list[str] = []
        finished: list[Ending] = []
        for h, token in zip(step.items, tokens, strict=True):
            seq = h.seq
            if h.released:  # released during the step: its blocks are free to go now
                self._free(h)
                self.worker.forget(h.rid)
                continue
            seq.output_token_ids.append(token)
            reason = self.worker.finish_reason(seq, token)
            rids.append(h.rid)
            indices.append(seq.num_output_tokens - 1)
            out_tokens.append(token)
            texts.append(h.text.advance(seq.output_token_ids, reason is not None))
            if reason is None:
                self.running[h.rid] = h
            else:
                finished.append(Ending(rid=h.rid, finish_reason=reason, text_end=seq.text_end))  # type: ignore[arg-type]
                self.running.pop(h.rid, None)
                self._free(h)
                self.worker.forget(h.rid)
        self.link.send(
            StepTokens(
                rids=rids, indices=indices, tokens=out_tokens, texts=texts, finished=finished,
                preempted=step.preempted, step_s=step_s,
            )
        )  # fmt: skip

    def _make_room(self) -> list[int]:
        """Gives every running sequence the block its next token needs, preempting the
        running request of the most-served client while blocks are short (the shared
        rule, :func:`disagg.scheduling.admission.make_room`)."""
        allocator = self.worker.allocator
        order = sorted(self.running.values(), key=lambda h: (h.arrival, h.rid))
        _, evicted = make_room(
            order,
            lambda h: blocks_for_tokens(h.seq.num_tokens, self.block_size) - len(h.seq.block_table),
            lambda: allocator.num_free,
            self.waiting.preemption_victim,
            self._preempt,
            lambda h, n: h.seq.block_table.extend(allocator.allocate(n)),
        )
        return [h.rid for h in evicted]

    def _preempt(self, h: Held) -> None:
        """Frees ``h``'s blocks and queues it again, to recompute its KV when readmitted
        (its ``Admitted`` then is no new charge: the coordinator charges input once)."""
        del self.running[h.rid]
        self._free(h)
        h.seq.num_preemptions += 1
        self.waiting.push(h)

    def _free(self, h: Held) -> None:
        self.worker.allocator.free(h.seq.block_table)
        h.seq.block_table = []

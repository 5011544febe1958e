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

from disagg.engine.detokenize import TextStream
from disagg.node.decoding import Decoding, DecodingNode, StepBatch
from disagg.node.transfers import TransferDone
from disagg.protocol.cluster import Admitted, CoordinatorToNode, DecodeTask, Release
from disagg.scheduling.admission import Limits, take_in_order

log = logging.getLogger(__name__)


class ColocatedNode(DecodingNode[Decoding]):
    # -- messages --------------------------------------------------------------------

    def handle(self, msg: CoordinatorToNode) -> None:
        if isinstance(msg, DecodeTask):
            self.tasks_seen = max(self.tasks_seen, msg.task)
            if msg.source is not None:  # a coordinator bug: this node holds no peer's KV
                log.warning("request %d came with a KV source; recomputed here", msg.rid)
            seq = self.sequence(msg, msg.output_token_ids)
            text = TextStream.resume(self.worker.tokenizer, seq.output_token_ids, msg.text_chars)
            self.waiting.push(Decoding(msg.rid, msg.client_id, msg.counter, msg.arrival, seq, text))
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
        d = self.running.pop(rid, None)
        if d is not None:
            self._forget(d)

    def on_transfer(self, done: TransferDone) -> None:
        log.warning("colocated node got a KV transfer it never asked for (%s)", done.rids)

    # -- admission and steps ---------------------------------------------------------

    def room(self) -> dict[str, int]:
        queued = sum(self._blocks_needed(d) for d in self.waiting)
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

    def _limits(self) -> Limits:
        return Limits(
            free=self.worker.allocator.num_free,
            max_seqs=self.settings.max_num_seqs,
            running=len(self.running),
            token_budget=self.settings.max_batch_tokens,
            watermark=self.watermark,
        )

    def _admit(self) -> list[Decoding]:
        """The engine's prefill rule: the queue's head and those behind it while they fit
        the free blocks, the sequence limit and the batch's token budget."""
        allocator = self.worker.allocator
        taken = take_in_order(
            self.waiting, self._limits(), self._blocks_needed, lambda d: d.seq.num_tokens
        )
        for d in taken:
            d.seq.block_table = allocator.allocate(self._blocks_needed(d))
        return taken

    def prepare_step(self) -> StepBatch[Decoding] | None:
        admitted = self._admit()
        if admitted:  # prefill first when a prompt fits, as the engine does
            self.link.send(Admitted(rids=[d.rid for d in admitted]))
            return self._stepping(StepBatch(admitted, prefill=True))
        if self.running:
            step = self._decode_step()
            return None if step is None else self._stepping(step)
        return None

"""The decode node: admits prefilled requests in merged-counter order when it has blocks
for them, pulls their KV from the prefill node that holds it, runs continuous batching,
streams every step's tokens in one message, and preempts (for recomputation) the
running request of the most-served client when blocks run out.

A request arrives with a source (the prefill node's KV endpoint: pull its KV) or without one
(resume: recompute the KV from the prompt and the tokens already streamed, which is
also how a preempted request or a failed pull comes back). Either way the client's
stream goes on from the next token index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from disagg.engine.detokenize import TextStream
from disagg.engine.sequence import blocks_for_tokens
from disagg.node.decoding import Decoding, DecodingNode, StepBatch
from disagg.node.transfers import TransferDone
from disagg.protocol.cluster import (
    CoordinatorToNode,
    DecodeTask,
    Pulled,
    PullGo,
    PullRequest,
    Release,
    SourceLost,
)
from disagg.scheduling.admission import Limits, take_in_order

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Incoming(Decoding):
    """A request whose KV is pulled from a prefill node, or recomputed here."""

    source: str | None = None  # the KV endpoint holding its prompt KV; None: recompute
    receiving: bool = False  # the KV receive is under way


class DecodeNode(DecodingNode[Incoming]):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pulling: dict[int, Incoming] = {}
        self.recompute: dict[int, Incoming] = {}
        # rid -> (peer, blocks) of a receive given up on (its source died): the blocks
        # stay with the transfer until it ends, then are freed.
        self.abandoned: dict[int, tuple[str, list[int]]] = {}

    # -- messages --------------------------------------------------------------------

    def handle(self, msg: CoordinatorToNode) -> None:
        if isinstance(msg, DecodeTask):
            self.tasks_seen = max(self.tasks_seen, msg.task)
            self.waiting.push(self._decoding(msg))
        elif isinstance(msg, PullGo):
            self._pull(msg)
        elif isinstance(msg, SourceLost):
            self._source_lost(msg.rid)
        elif isinstance(msg, Release):
            self._release(msg.rid)
        else:
            log.warning("decode node ignores %s", msg.type)

    def _decoding(self, t: DecodeTask) -> Incoming:
        seq = self.sequence(t, t.output_token_ids)
        text = TextStream.resume(self.worker.tokenizer, seq.output_token_ids, t.text_chars)
        return Incoming(t.rid, t.client_id, t.counter, t.arrival, seq, text, source=t.source)

    def _pull(self, msg: PullGo) -> None:
        """One transfer for every request in ``msg.rids``, blocks back to back. A request
        no longer pulling here is left out; the transfer is then refused by the header
        check and the others recompute."""
        blocks: list[int] = []
        for rid in msg.rids:
            d = self.pulling.get(rid)
            if d is None or d.receiving:
                continue
            d.receiving = True
            n = d.seq.num_prompt_tokens
            blocks += d.seq.block_table[: blocks_for_tokens(n, self.block_size)]
        peer_layout = (msg.peer_tp, msg.peer_pp)
        self.transfers.recv(tuple(msg.rids), blocks, msg.source, msg.epoch, peer_layout)

    def _source_lost(self, rid: int) -> None:
        """``rid``'s KV source is gone: recompute it here. A receive already under way
        may wait on the dead peer until its timeout (forming a pair with a process that
        died blocks until then), so the request does not wait for it: the blocks the
        receive may still write stay with it, and the request is admitted again into
        fresh ones."""
        waiting = self.waiting.get(rid)
        if waiting is not None:
            waiting.source = None
        d = self.pulling.pop(rid, None)
        if d is None:
            return
        source, d.source = d.source, None
        if not d.receiving:
            self.recompute[rid] = d
            return
        self.abandoned[rid] = (source or "", d.seq.block_table)
        d.seq.block_table, d.receiving = [], False
        if not d.released:
            self.waiting.push(d)

    def _release(self, rid: int) -> None:
        if self.waiting.remove(rid) is not None:
            return
        stepping = self.stepping.get(rid)
        if stepping is not None:  # its blocks are in use by the step: free them after
            stepping.released = True
            self.running.pop(rid, None)
            return
        d = self.pulling.get(rid)
        if d is not None and d.receiving:
            d.released = True
            return
        d = (
            self.pulling.pop(rid, None)
            or self.recompute.pop(rid, None)
            or self.running.pop(rid, None)
        )
        if d is not None:
            self._forget(d)

    def on_transfer(self, done: TransferDone) -> None:
        self.link.send(Pulled(source=done.peer, **done.report()))
        for rid in done.rids:
            abandoned = self.abandoned.get(rid)
            if abandoned is not None and abandoned[0] == done.peer:
                del self.abandoned[rid]
                self.worker.allocator.free(abandoned[1])
                continue
            d = self.pulling.get(rid)
            if d is None or not d.receiving:
                continue
            del self.pulling[rid]
            if d.released:
                self._forget(d)
            elif done.error is None:
                self.running[d.rid] = d
            else:  # the KV did not arrive whole: recompute it here
                d.source = None
                self.recompute[d.rid] = d

    # -- admission and steps ---------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running or self.recompute)

    def between_steps(self) -> None:
        self._admit()  # pulls start while a step runs

    def room(self) -> dict[str, int]:
        queued = sum(self._blocks_needed(d) for d in self.waiting)
        free = self.worker.allocator.num_free - queued - self.watermark
        return {
            "free_tokens": max(0, free) * self.block_size,
            "queued": len(self.waiting),
            "running": len(self.running) + len(self.recompute) + len(self.pulling),
            "held": 0,
        }

    def _in_flight(self) -> int:
        return len(self.running) + len(self.recompute) + len(self.pulling)

    def _admit(self) -> None:
        allocator = self.worker.allocator
        limits = Limits(
            free=allocator.num_free,
            max_seqs=self.settings.max_num_seqs,
            running=self._in_flight(),
            watermark=self.watermark,
        )
        pulls: list[int] = []
        for d in take_in_order(self.waiting, limits, self._blocks_needed):
            d.seq.block_table = allocator.allocate(self._blocks_needed(d))
            if d.source is not None:
                self.pulling[d.rid] = d
                pulls.append(d.rid)
            else:
                self.recompute[d.rid] = d
        if pulls:  # one message; the coordinator batches them per prefill node
            self.link.send(PullRequest(rids=pulls))

    def prepare_step(self) -> StepBatch[Incoming] | None:
        if self.recompute:  # resumed, preempted or failed pulls: prefill their KV here
            budget = self.settings.max_batch_tokens
            batch: list[Incoming] = []
            tokens = 0
            for d in list(self.recompute.values()):
                n = d.seq.num_tokens
                if batch and tokens + n > budget:
                    break
                batch.append(d)
                tokens += n
            for d in batch:
                del self.recompute[d.rid]
            return self._stepping(StepBatch(batch, prefill=True))
        if self.running:
            step = self._decode_step()
            return None if step is None else self._stepping(step)
        return None

    def _preempt(self, d: Incoming) -> None:
        d.source = None  # recomputed here when readmitted
        super()._preempt(d)

"""The prefill node: batches prompts under a token budget in merged-counter order, runs
prefill, samples the first token (reported at once: that is TTFT), and holds each
request's KV blocks until a decode node pulls them. Its credit counts held blocks as
used, so a pool full of unpulled KV stops new work arriving (back-pressure)."""

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
    CoordinatorToNode,
    Prefilled,
    PrefillResult,
    PrefillTask,
    Push,
    Pushed,
    Release,
    TaskFailed,
)
from disagg.scheduling.admission import Limits, take_in_order

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Waiting:
    rid: int
    client_id: str
    counter: float
    arrival: float
    task: PrefillTask


@dataclass(slots=True)
class Held:
    """KV of a prefilled request, kept until pushed (or released)."""

    rid: int
    blocks: list[int]
    num_tokens: int
    pushing: bool = False
    released: bool = False  # released while a push was in flight: free when it ends
    since: float = field(default_factory=time.monotonic)


def _tokens(w: Waiting) -> int:
    return len(w.task.prompt_token_ids)


def _blocks(w: Waiting, block_size: int) -> int:
    return blocks_for_tokens(len(w.task.prompt_token_ids), block_size)


class PrefillNode(NodeRuntime):
    waiting: CounterQueue[Waiting]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: dict[int, Held] = {}

    # -- messages --------------------------------------------------------------------

    def handle(self, msg: CoordinatorToNode) -> None:
        if isinstance(msg, PrefillTask):
            self.tasks_seen = max(self.tasks_seen, msg.task)
            self.waiting.push(Waiting(msg.rid, msg.client_id, msg.counter, msg.arrival, msg))
        elif isinstance(msg, Push):
            self._push(msg)
        elif isinstance(msg, Release):
            self._release(msg.rid)
        else:
            log.warning("prefill node ignores %s", msg.type)

    def _push(self, msg: Push) -> None:
        """One transfer for every request in ``msg.rids``: each one's blocks, in order.
        A request not held here is left out, so the receiver's header check (which
        expects all of them) refuses the transfer and nothing is written."""
        blocks: list[int] = []
        for rid in msg.rids:
            held = self.held.get(rid)
            if held is None or held.pushing:
                continue
            held.pushing = True
            blocks += held.blocks[: blocks_for_tokens(held.num_tokens, self.block_size)]
        peer_layout = (msg.peer_tp, msg.peer_pp)
        self.transfers.send(tuple(msg.rids), blocks, msg.dest, msg.epoch, peer_layout)

    def _release(self, rid: int) -> None:
        if self.waiting.remove(rid) is not None:
            return
        held = self.held.get(rid)
        if held is None:
            return
        if held.pushing:
            held.released = True
        else:
            self._free(held)

    def _free(self, held: Held) -> None:
        del self.held[held.rid]
        self.worker.allocator.free(held.blocks)

    def on_transfer(self, done: TransferDone) -> None:
        for rid in done.rids:  # sent or not, the KV is released: a failed pull recomputes
            held = self.held.get(rid)
            if held is not None and held.pushing:
                self._free(held)
        self.link.send(Pushed(dest=done.peer, **done.report()))

    # -- prefill ---------------------------------------------------------------------

    def has_work(self) -> bool:
        head = self.waiting.peek()
        return head is not None and self._limits().admits(_blocks(head, self.block_size))

    def room(self) -> dict[str, int]:
        queued_blocks = sum(_blocks(w, self.block_size) for w in self.waiting)
        free = self.worker.allocator.num_free - queued_blocks
        return {
            "free_tokens": max(0, free) * self.block_size,
            "queued": len(self.waiting),
            "running": 0,
            "held": len(self.held),
        }

    def _limits(self) -> Limits:
        # No watermark: held KV does not grow (decode computes the next tokens), so
        # nothing needs room kept beside it. Held requests are not in the batch, so
        # they do not count against the sequence cap; their blocks are not free.
        return Limits(
            free=self.worker.allocator.num_free,
            max_seqs=self.settings.max_num_seqs,
            token_budget=self.settings.max_batch_tokens,
        )

    def prepare_step(self) -> list[Sequence] | None:
        bs = self.block_size
        batch = take_in_order(self.waiting, self._limits(), lambda w: _blocks(w, bs), _tokens)
        if not batch:
            return None
        seqs = []
        for w in batch:
            seq = self.sequence(w.task)
            seq.block_table = self.worker.allocator.allocate(_blocks(w, bs))
            seqs.append(seq)
        return seqs

    def execute(self, seqs: list[Sequence]) -> tuple[list[int], float, float]:
        start = time.monotonic()
        tokens = self.worker.execute(seqs, True, self.generator)
        return tokens, start, time.monotonic() - start

    def finish_step(self, seqs: list[Sequence], result) -> None:
        for seq in seqs:  # this node runs a sequence once; what it holds after is KV
            self.worker.forget(seq.seq_id)
        if isinstance(result, Exception):
            for seq in seqs:
                self.worker.allocator.free(seq.block_table)
                self.link.send(TaskFailed(rid=seq.seq_id, message=f"prefill failed: {result!r}"))
            return
        tokens, start, elapsed = result
        results = []
        for seq, token in zip(seqs, tokens, strict=True):
            seq.output_token_ids.append(token)
            reason = self.worker.finish_reason(seq, token)
            if reason is None:
                self.held[seq.seq_id] = Held(seq.seq_id, seq.block_table, seq.num_prompt_tokens)
            else:
                self.worker.allocator.free(seq.block_table)
            results.append(
                PrefillResult(
                    rid=seq.seq_id,
                    first_token=token,
                    finish_reason=reason,
                    text_end=seq.text_end,
                    # the first token's text; a decode node's stream goes on from it
                    text=TextStream(self.worker.tokenizer).advance(
                        seq.output_token_ids, reason is not None
                    ),
                    prefill_start=start,
                    prefill_s=elapsed,
                )
            )
        self.link.send(Prefilled(results=results))

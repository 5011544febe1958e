"""A simulated decode node: admits tasks in counter order while it has sequence slots and
blocks (above the watermark beside others; a head that does not fit waits), pulls each
prefilled KV (the profile's transfer time) or recomputes it (the profile's prefill time),
and runs continuous batching: each step sleeps the profile's decode time for its batch
and reports one deterministic token per sequence in one ``StepTokens``. Blocks grow with
the context; when short, the newest sequence is preempted and recomputes later."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from disagg.engine.detokenize import TextStream
from disagg.protocol.cluster import (
    DecodeTask,
    Ending,
    Pulled,
    PullGo,
    PullRequest,
    Release,
    SourceLost,
    StepTokens,
)
from disagg.simulated.base import SimNode, ordered


@dataclass(slots=True, eq=False)
class Seq:
    rid: int
    client_id: str
    counter: float
    arrival: float
    prompt: int  # prompt tokens
    output_ids: list[int]  # output tokens so far (the stream resumes after them)
    max_tokens: int
    source: str | None
    text: TextStream
    blocks: int = 0
    receiving: bool = False
    released: bool = False

    @property
    def output(self) -> int:
        return len(self.output_ids)

    @property
    def context(self) -> int:
        return self.prompt + len(self.output_ids)


class SimDecode(SimNode):
    role = "decode"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.waiting: dict[int, Seq] = {}
        self.pulling: dict[int, Seq] = {}
        self.recompute: dict[int, Seq] = {}
        self.running: dict[int, Seq] = {}
        self.in_step: dict[int, Seq] = {}  # a recompute batch being stepped

    # -- messages ----------------------------------------------------------------------

    def handle(self, msg: Any) -> None:
        if isinstance(msg, DecodeTask):
            self.tasks_seen = max(self.tasks_seen, msg.task)
            output = list(msg.output_token_ids)
            self.waiting[msg.rid] = Seq(
                msg.rid, msg.client_id, msg.counter, msg.arrival, len(msg.prompt_token_ids),
                output, msg.sampling.max_tokens, msg.source,
                TextStream.resume(self.spec.tokenizer, output, msg.text_chars),
            )  # fmt: skip
        elif isinstance(msg, PullGo):
            seqs = [self.pulling[r] for r in msg.rids if r in self.pulling]
            for s in seqs:
                s.receiving = True
            asyncio.get_running_loop().create_task(self._receive(msg, seqs))
        elif isinstance(msg, SourceLost):
            if msg.rid in self.waiting:
                self.waiting[msg.rid].source = None
            s = self.pulling.pop(msg.rid, None)
            if s is not None and not s.receiving:
                s.source = None
                self.recompute[s.rid] = s
            elif s is not None:  # the receive goes on, but the request does not wait for it
                self.free_blocks += s.blocks
                s.blocks, s.source, s.receiving = 0, None, False
                self.waiting[s.rid] = s
        elif isinstance(msg, Release):
            s = (
                self.waiting.pop(msg.rid, None)
                or self.pulling.pop(msg.rid, None)
                or self.recompute.pop(msg.rid, None)
                or self.running.pop(msg.rid, None)
                or self.in_step.pop(msg.rid, None)
            )
            if s is not None:
                s.released = True
                self.free_blocks += s.blocks
                s.blocks = 0

    async def _receive(self, msg: PullGo, seqs: list[Seq]) -> None:
        tokens = sum(s.prompt for s in seqs)
        seconds = self.spec.transfer_s(tokens)
        await asyncio.sleep(seconds)
        self.send(
            Pulled(
                rids=msg.rids, bytes=tokens * self.spec.latency.kv_bytes_per_token,
                seconds=seconds, source=msg.source, epoch=msg.epoch,
            )
        )  # fmt: skip
        for s in seqs:
            if self.pulling.get(s.rid) is s:
                del self.pulling[s.rid]
                s.receiving = False
                self.running[s.rid] = s
        self.changed()

    # -- admission -------------------------------------------------------------------

    def _in_flight(self) -> int:
        return len(self.running) + len(self.recompute) + len(self.pulling)

    def _admit(self) -> None:
        pulls: list[int] = []
        for s in ordered(list(self.waiting.values()), self.counters):
            need = self.spec.blocks(s.context + 1)
            if self._in_flight() >= self.spec.max_num_seqs:
                break
            if self.free_blocks - need < self.watermark and self._in_flight():
                break  # the head that does not fit is not overtaken
            if need > self.free_blocks:
                break
            del self.waiting[s.rid]
            s.blocks = need
            self.free_blocks -= need
            if s.source is not None:
                self.pulling[s.rid] = s
                pulls.append(s.rid)
            else:
                self.recompute[s.rid] = s
        if pulls:
            self.send(PullRequest(rids=pulls))

    def room(self) -> dict[str, int]:
        queued = sum(self.spec.blocks(s.context + 1) for s in self.waiting.values())
        free = self.free_blocks - queued - self.watermark
        return {
            "free_tokens": max(0, free) * self.spec.block_size,
            "queued": len(self.waiting),
            "running": self._in_flight(),
            "held": 0,
        }

    # -- steps -------------------------------------------------------------------------

    async def steps(self) -> None:
        latency = self.spec.latency
        last_end = time.monotonic()
        while True:
            self._admit()
            if self.recompute:  # resumed or preempted: prefill their context here
                batch = list(self.recompute.values())
                self.recompute.clear()
                self.in_step = {s.rid: s for s in batch}
                lens = [s.context for s in batch]
                seconds = latency.prefill_time(sum(lens), sum(n * n for n in lens), len(lens))
                await self.sleep_until(time.monotonic() + seconds)
                self.in_step = {}
                for s in batch:
                    if not s.released:
                        self.running[s.rid] = s
                continue
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
                last_end = time.monotonic()
                continue
            preempted = self._grow()
            batch = list(self.running.values())
            seconds = latency.decode_time(len(batch), sum(s.context + 1 for s in batch))
            # Deadlines chain from the last step's end: a late wake-up shortens the next
            # sleep, so the node keeps the profile's rate on a busy host.
            last_end = max(last_end, time.monotonic() - seconds) + seconds
            await self.sleep_until(last_end)
            rids: list[int] = []
            indices: list[int] = []
            tokens: list[int] = []
            texts: list[str] = []
            finished: list[Ending] = []
            for s in batch:
                if s.released:
                    continue
                index = len(s.output_ids)
                token = self.spec.token(s.rid, index)
                s.output_ids.append(token)
                done = s.output >= s.max_tokens or s.context >= self.spec.max_model_len
                rids.append(s.rid)
                indices.append(index)
                tokens.append(token)
                texts.append(s.text.advance(s.output_ids, done))
                if done:
                    finished.append(Ending.model_construct(rid=s.rid, finish_reason="length"))
                    del self.running[s.rid]
                    self.free_blocks += s.blocks
            self.send(
                StepTokens.model_construct(
                    rids=rids, indices=indices, tokens=tokens, texts=texts, finished=finished,
                    preempted=preempted, step_s=seconds,
                )
            )  # fmt: skip
            self.changed()

    def _grow(self) -> list[int]:
        """Every running sequence gets the block its next token needs; while blocks are
        short the newest one is preempted (it recomputes when admitted again)."""
        preempted: list[int] = []
        for s in sorted(self.running.values(), key=lambda s: (s.arrival, s.rid)):
            need = self.spec.blocks(s.context + 1) - s.blocks
            while need > self.free_blocks and s.rid in self.running:
                victim = max(self.running.values(), key=lambda v: (v.arrival, v.rid))
                del self.running[victim.rid]
                self.free_blocks += victim.blocks
                victim.blocks, victim.source = 0, None
                self.waiting[victim.rid] = victim
                preempted.append(victim.rid)
            if s.rid in self.running and need > 0:
                s.blocks += need
                self.free_blocks -= need
        return preempted

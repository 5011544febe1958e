"""A simulated prefill node: batches waiting prompts in counter order within its token
budget and blocks (a head that does not fit waits), sleeps the profile's prefill time,
reports the first tokens, holds each KV until pushed or released."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from disagg.engine.detokenize import TextStream
from disagg.protocol.cluster import (
    Prefilled,
    PrefillResult,
    PrefillTask,
    Push,
    Pushed,
    Release,
)
from disagg.simulated.base import SimNode, ordered


@dataclass(slots=True)
class Waiting:
    rid: int
    client_id: str
    counter: float
    arrival: float
    num_tokens: int
    max_tokens: int


@dataclass(slots=True)
class Held:
    num_tokens: int
    blocks: int
    pushing: bool = False


class SimPrefill(SimNode):
    role = "prefill"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.waiting: dict[int, Waiting] = {}
        self.held: dict[int, Held] = {}

    def handle(self, msg: Any) -> None:
        if isinstance(msg, PrefillTask):
            self.tasks_seen = max(self.tasks_seen, msg.task)
            self.waiting[msg.rid] = Waiting(
                msg.rid, msg.client_id, msg.counter, msg.arrival,
                len(msg.prompt_token_ids), msg.sampling.max_tokens,
            )  # fmt: skip
        elif isinstance(msg, Push):
            asyncio.get_running_loop().create_task(self._push(msg))
        elif isinstance(msg, Release):
            self._release(msg.rid)

    def _release(self, rid: int) -> None:
        if self.waiting.pop(rid, None) is not None:
            return
        held = self.held.get(rid)
        if held is not None and not held.pushing:  # (a push under way frees it at its end)
            self._free(rid)

    def _free(self, rid: int) -> None:
        self.free_blocks += self.held.pop(rid).blocks

    async def _push(self, msg: Push) -> None:
        rids = [rid for rid in msg.rids if rid in self.held and not self.held[rid].pushing]
        for rid in rids:
            self.held[rid].pushing = True
        tokens = sum(self.held[rid].num_tokens for rid in rids)
        seconds = self.spec.transfer_s(tokens)
        await asyncio.sleep(seconds)
        for rid in rids:
            if rid in self.held:
                self._free(rid)
        complete = len(rids) == len(msg.rids)  # a real receiver refuses a partial transfer
        self.send(
            Pushed(
                rids=msg.rids, bytes=tokens * self.spec.latency.kv_bytes_per_token,
                seconds=seconds, error=None if complete else "not all held here",
                dest=msg.dest, epoch=msg.epoch,
            )
        )  # fmt: skip
        self.changed()

    def room(self) -> dict[str, int]:
        queued = sum(self.spec.blocks(w.num_tokens) for w in self.waiting.values())
        return {
            "free_tokens": max(0, self.free_blocks - queued) * self.spec.block_size,
            "queued": len(self.waiting),
            "running": 0,
            "held": len(self.held),
        }

    def _next_batch(self) -> list[Waiting]:
        budget, free = self.spec.max_batch_tokens, self.free_blocks
        batch: list[Waiting] = []
        tokens = 0
        for w in ordered(self.waiting.values(), self.counters):
            need = self.spec.blocks(w.num_tokens)
            if need > free or (batch and tokens + w.num_tokens > budget):
                break  # the head that does not fit is not overtaken
            batch.append(w)
            tokens += w.num_tokens
            free -= need
        return batch

    async def steps(self) -> None:
        latency = self.spec.latency
        while True:
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            for w in batch:
                del self.waiting[w.rid]
                self.free_blocks -= self.spec.blocks(w.num_tokens)
            lens = [w.num_tokens for w in batch]
            seconds = latency.prefill_time(sum(lens), sum(n * n for n in lens), len(lens))
            start = time.monotonic()
            await self.sleep_until(start + seconds)
            results = []
            tokenizer = self.spec.tokenizer
            for w in batch:
                blocks = self.spec.blocks(w.num_tokens)
                done = w.max_tokens <= 1 or w.num_tokens + 1 >= self.spec.max_model_len
                if done:
                    self.free_blocks += blocks
                else:
                    self.held[w.rid] = Held(w.num_tokens, blocks)
                first = self.spec.token(w.rid, 0)
                results.append(
                    PrefillResult.model_construct(
                        rid=w.rid, first_token=first,
                        finish_reason="length" if done else None, text_end=None,
                        text=TextStream(tokenizer).advance([first], done),
                        prefill_start=start, prefill_s=seconds,
                    )
                )  # fmt: skip
            self.send(Prefilled.model_construct(results=results))
            self.changed()

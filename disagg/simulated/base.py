"""What both simulated node kinds share: the DEALER to the coordinator, registration,
credit (also the heartbeat), counter-ordered waiting tasks, and a block pool."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from disagg.engine.tokenizer import Tokenizer
from disagg.protocol.cluster import (
    Counters,
    Credit,
    Goodbye,
    NodeBatch,
    Refused,
    Register,
    Role,
    Shutdown,
    Welcome,
    _NodeMessage,
    decode_from_coordinator,
    encode_node,
)
from disagg.scheduling.admission import watermark
from disagg.sim.latency import FittedLatency

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
COORDINATOR_TIMEOUT_S = 15.0  # nothing from the coordinator this long: stop (as real nodes)


@dataclass(frozen=True, slots=True)
class SimSpec:
    """One simulated node's shape: its latency model (batch times, KV capacity and
    bytes per token), and the limits a real node takes from its command line."""

    latency: FittedLatency
    block_size: int = 16
    max_batch_tokens: int = 8192
    max_num_seqs: int = 128
    max_model_len: int = 2048
    vocab_size: int = 32000
    eos_token_ids: tuple[int, ...] = ()
    bandwidth_bytes_per_s: float = 25e9  # KV between two instances
    handoff_s: float = 1e-4  # fixed cost of one transfer
    # Detokenises the outputs as a real node does (None: no text, as a model without one)
    tokenizer: Tokenizer | None = None

    @property
    def num_blocks(self) -> int:
        return self.latency.kv_capacity_tokens // self.block_size

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def transfer_s(self, tokens: int) -> float:
        return (
            self.handoff_s + tokens * self.latency.kv_bytes_per_token / self.bandwidth_bytes_per_s
        )

    def token(self, rid: int, index: int) -> int:
        """The output token ``index`` of request ``rid``: the same on every node and run,
        never the end-of-sequence token (outputs end by length)."""
        token = (rid * 7919 + index * 104729 + 17) % self.vocab_size
        while token in self.eos_token_ids:
            token = (token + 1) % self.vocab_size
        return token


def ordered(items: Any, counters: dict[str, float]) -> list[Any]:
    """Waiting tasks in merged-counter order, as a real node orders them."""
    return sorted(
        items,
        key=lambda w: (max(w.counter, counters.get(w.client_id, 0.0)), w.arrival, w.rid),
    )


class SimNode:
    role: Role

    def __init__(
        self,
        node_id: str,
        spec: SimSpec,
        coordinator: str,
        ctx: zmq.asyncio.Context,
        *,
        model: str,
        secret: str | None,
    ):
        self.node_id = node_id
        self.spec = spec
        self.endpoint = f"{node_id}@{os.urandom(4).hex()}"
        self.model = model
        self.secret = secret
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # sends never fail (a full pipe would raise)
        self.sock.connect(coordinator)
        self.free_blocks = spec.num_blocks
        self.watermark = watermark(spec.num_blocks)
        self.tasks_seen = 0
        self.counters: dict[str, float] = {}
        self.stopping = False
        self._last_credit: dict[str, int] | None = None
        self._credit_due = False
        self._wake = asyncio.Event()  # the step loop has something new to look at

    # -- role-specific ---------------------------------------------------------------

    def handle(self, msg: Any) -> None:
        raise NotImplementedError

    def room(self) -> dict[str, int]:
        raise NotImplementedError

    async def steps(self) -> None:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------

    def send(self, msg: _NodeMessage) -> None:
        self.sock.send_multipart(encode_node(msg), flags=zmq.NOBLOCK)

    def changed(self) -> None:
        """State moved: credit is sent once this turn of the loop ends; steps look again."""
        self._wake.set()
        if not self._credit_due:
            self._credit_due = True
            asyncio.get_running_loop().call_soon(self._send_credit)

    def _send_credit(self, force: bool = False) -> None:
        self._credit_due = False
        room = {**self.room(), "tasks_seen": self.tasks_seen}
        if force or room != self._last_credit:
            self.send(Credit(**room))
            self._last_credit = room

    def register_message(self) -> Register:
        s = self.spec
        return Register(
            node_id=self.node_id, role=self.role, endpoint=self.endpoint, secret=self.secret,
            model=self.model, block_size=s.block_size,
            capacity_tokens=s.num_blocks * s.block_size,
            max_model_len=s.max_model_len, max_batch_tokens=s.max_batch_tokens, pid=os.getpid(),
        )  # fmt: skip

    async def run(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the coordinator may start after us
            self.send(self.register_message())
            if await self.sock.poll(1000):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node_id}: no answer from the coordinator")
        steps = asyncio.create_task(self.steps())
        steps.add_done_callback(self._steps_ended)
        beat = asyncio.create_task(self._heartbeat())
        try:
            while not self.stopping:
                if not await self.sock.poll(int(COORDINATOR_TIMEOUT_S * 1000)):
                    log.error("%s: no word from the coordinator: stopping", self.node_id)
                    break
                msg = decode_from_coordinator(await self.sock.recv_multipart())
                for one in msg.messages if isinstance(msg, NodeBatch) else [msg]:
                    self._take(one)
        finally:
            steps.cancel()
            beat.cancel()
            self.send(Goodbye())
            self.sock.close(linger=100)

    def _take(self, msg: Any) -> None:
        if isinstance(msg, Refused):
            raise RuntimeError(f"{self.node_id} refused: {msg.reason}")
        if isinstance(msg, Welcome):
            self._publish(msg.counters)
        elif isinstance(msg, Counters):
            self._publish(msg.values)
        elif isinstance(msg, Shutdown):
            self.stopping = True
        else:
            self.handle(msg)
            self.changed()

    def _steps_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug: say so, stop
            log.error("%s: its step loop failed", self.node_id, exc_info=task.exception())
            self.stopping = True

    def _publish(self, counters: dict[str, float]) -> None:
        own = self.counters
        for client, value in counters.items():
            if value > own.get(client, 0.0):
                own[client] = value

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._send_credit(force=True)

    async def sleep_until(self, deadline: float) -> None:
        """A model step's time passing (sleep, not compute)."""
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

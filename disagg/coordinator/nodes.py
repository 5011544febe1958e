"""The coordinator's picture of its nodes: who is alive, their ranks, and how much work
each can still take (credit)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.engine.parallel.handoff import KVNodeLayout
from disagg.protocol.cluster import Credit, Register, Role


@dataclass(eq=False)
class NodeState:
    node_id: str
    identity: bytes  # the node's ZeroMQ routing id
    role: Role
    endpoint: str  # its KV endpoint (node id + incarnation)
    block_size: int
    capacity_tokens: int
    max_model_len: int
    max_batch_tokens: int
    pid: int
    kv: KVNodeLayout | None = None  # its pool's shape and parallel layout, if stated
    alive: bool = True
    last_seen: float = 0.0  # when it was last heard from (the coordinator's clock)
    free_tokens: int = 0
    tasks_seen: int = 0
    queued: int = 0
    running: int = 0
    held: int = 0
    next_task: int = 0
    # Tasks sent that the node had not seen at its last credit: (task number, tokens).
    unacked: deque[tuple[int, int]] = field(default_factory=deque)
    unacked_tokens: int = 0  # their sum (dispatch reads it per request)
    requests: set[int] = field(default_factory=set)  # rids it has work or KV for
    model_s: float = 0.0  # model time of the batches and steps it reported

    @classmethod
    def from_register(cls, identity: bytes, msg: Register, now: float) -> NodeState:
        return cls(
            node_id=msg.node_id,
            identity=identity,
            role=msg.role,
            endpoint=msg.endpoint,
            block_size=msg.block_size,
            capacity_tokens=msg.capacity_tokens,
            max_model_len=msg.max_model_len,
            max_batch_tokens=msg.max_batch_tokens,
            pid=msg.pid,
            kv=msg.kv,
            free_tokens=msg.capacity_tokens,
            last_seen=now,
        )

    def update(self, credit: Credit, now: float) -> None:
        self.last_seen = now
        self.free_tokens = credit.free_tokens
        self.tasks_seen = credit.tasks_seen
        self.queued, self.running, self.held = credit.queued, credit.running, credit.held
        while self.unacked and self.unacked[0][0] <= credit.tasks_seen:
            self.unacked_tokens -= self.unacked.popleft()[1]

    def available(self) -> int:
        """Tokens of KV this node can still take, counting tasks in flight to it."""
        return self.free_tokens - self.unacked_tokens

    def reserve(self, tokens: int) -> int:
        """A new task of ``tokens`` (block-rounded) is sent: its number."""
        self.next_task += 1
        self.unacked.append((self.next_task, tokens))
        self.unacked_tokens += tokens
        return self.next_task

    @property
    def layout(self) -> tuple[int, int]:
        """(tp, pp) of its ranks; (1, 1) when not stated."""
        return (self.kv.tp, self.kv.pp) if self.kv is not None else (1, 1)

    def blocks_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size) * self.block_size

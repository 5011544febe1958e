"""What one core handler decided to send: replies to clients and messages to nodes, in
the order they were decided (the shell sends them in that order, per peer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from disagg.protocol import Batch
from disagg.protocol.cluster import NodeBatch, _NodeMessage


@dataclass(slots=True)
class Outbox:
    # (the client's routing id, a disagg.protocol server message)
    clients: list[tuple[bytes, Any]] = field(default_factory=list)
    # (the node's routing id, a disagg.protocol.cluster message)
    nodes: list[tuple[bytes, _NodeMessage]] = field(default_factory=list)

    def take(self) -> Outbox:
        """Everything decided since the last take; this outbox starts empty again."""
        taken = Outbox(self.clients, self.nodes)
        self.clients, self.nodes = [], []
        return taken

    def extend(self, other: Outbox) -> None:
        self.clients.extend(other.clients)
        self.nodes.extend(other.nodes)

    def __bool__(self) -> bool:
        return bool(self.clients or self.nodes)


def coalesced(
    sends: list[tuple[bytes, Any]], batch: Callable[[list[Any]], Any]
) -> list[tuple[bytes, Any]]:
    """``sends`` as one message per peer: a peer's messages in their order, wrapped by
    ``batch`` when there are several (a client's ``Batch``, a node's ``NodeBatch``). Per
    message, a send costs far more than its bytes; across peers order means nothing."""
    by_peer: dict[bytes, list[Any]] = {}
    for identity, msg in sends:
        by_peer.setdefault(identity, []).append(msg)
    return [
        (identity, msgs[0] if len(msgs) == 1 else batch(msgs)) for identity, msgs in by_peer.items()
    ]


def client_batch(msgs: list[Any]) -> Batch:
    return Batch.model_construct(messages=msgs)


def node_batch(msgs: list[Any]) -> NodeBatch:
    return NodeBatch.model_construct(messages=msgs)

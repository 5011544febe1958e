"""What one core handler decided to send: replies to clients and messages to nodes, in
the order they were decided (the shell sends them in that order, per peer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from disagg.protocol.cluster import _NodeMessage


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

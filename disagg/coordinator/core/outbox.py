"""What one core handler decided to send: replies to clients and messages to nodes, in
the order they were decided (the shell sends them in that order, per peer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from disagg.protocol import TokenBatch, Tokens
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


def coalesced(clients: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
    """``clients`` with each connection's consecutive ``tokens`` chunks merged into one
    ``token_batch`` (a lone chunk stays ``tokens``): one message per connection per
    decode step instead of one per request. Per connection the order is kept: pending
    chunks go out before that connection's next other message (a ``finished`` never
    overtakes its request's last chunk); across connections order means nothing."""
    out: list[tuple[bytes, Any]] = []
    pending: dict[bytes, list[Tokens]] = {}
    for identity, msg in clients:
        if msg.type == "tokens":
            pending.setdefault(identity, []).append(msg)
            continue
        chunks = pending.pop(identity, None)
        if chunks:
            out.append((identity, _one_message(chunks)))
        out.append((identity, msg))
    out.extend((identity, _one_message(chunks)) for identity, chunks in pending.items())
    return out


def _one_message(chunks: list[Tokens]) -> Tokens | TokenBatch:
    return chunks[0] if len(chunks) == 1 else TokenBatch.model_construct(chunks=chunks)

"""What one core handler decided to send: replies to clients and messages to nodes, in
the order they were decided (the shell sends them in that order, per peer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from disagg.protocol import Batch, Tokens
from disagg.protocol.cluster import NodeBatch, _NodeMessage


@dataclass(slots=True)
class StreamedTokens:
    """One connection's streamed tokens, as they are decided: sent as one ``Tokens``
    message (columns, one entry per token)."""

    request_ids: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def add(self, request_id: str, index: int, token: int, text: str) -> None:
        self.request_ids.append(request_id)
        self.indices.append(index)
        self.token_ids.append(token)
        self.texts.append(text)

    def extend(self, other: StreamedTokens) -> None:
        self.request_ids.extend(other.request_ids)
        self.indices.extend(other.indices)
        self.token_ids.extend(other.token_ids)
        self.texts.extend(other.texts)

    def message(self) -> Tokens:  # (built unvalidated: every field is the coordinator's own)
        return Tokens.model_construct(
            request_ids=self.request_ids,
            indices=self.indices,
            token_ids=self.token_ids,
            texts=self.texts,
        )


@dataclass(slots=True)
class Outbox:
    """What was decided, in order. A connection's streamed tokens gather in one
    :class:`StreamedTokens`, placed where the first of them was decided. That keeps
    each request's order: what a request is sent before its tokens (``Accepted``) went
    out in an earlier turn (its tokens answer a task dispatched at the end of that
    turn), and what it is sent after them (``Finished``, ``Error``) ends it."""

    # (the client's routing id, a disagg.protocol server message or StreamedTokens)
    clients: list[tuple[bytes, Any]] = field(default_factory=list)
    # (the node's routing id, a disagg.protocol.cluster message)
    nodes: list[tuple[bytes, _NodeMessage]] = field(default_factory=list)
    # the StreamedTokens in ``clients``, by connection
    streams: dict[bytes, StreamedTokens] = field(default_factory=dict)

    def stream(self, identity: bytes) -> StreamedTokens:
        """The connection's streamed tokens (from here on, in this outbox)."""
        tokens = self.streams.get(identity)
        if tokens is None:
            tokens = self.streams[identity] = StreamedTokens()
            self.clients.append((identity, tokens))
        return tokens

    def take(self) -> Outbox:
        """Everything decided since the last take; this outbox starts empty again."""
        taken = Outbox(self.clients, self.nodes, self.streams)
        self.clients, self.nodes, self.streams = [], [], {}
        return taken

    def extend(self, other: Outbox) -> None:
        """Appends ``other``'s messages; its streamed tokens join this outbox's of the
        same connection."""
        if not other.streams:
            self.clients.extend(other.clients)
        else:
            for identity, msg in other.clients:
                if type(msg) is StreamedTokens:
                    mine = self.streams.get(identity)
                    if mine is not None:
                        mine.extend(msg)
                        continue
                    self.streams[identity] = msg
                self.clients.append((identity, msg))
        self.nodes.extend(other.nodes)

    def client_sends(self) -> list[tuple[bytes, Any]]:
        """``clients`` as protocol messages (streamed tokens as ``Tokens``)."""
        if not self.streams:
            return self.clients
        return [
            (identity, msg.message() if type(msg) is StreamedTokens else msg)
            for identity, msg in self.clients
        ]

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

"""The shell's one message per peer: a peer's messages in order, in one batch; a
connection's streamed tokens in one ``Tokens`` of columns."""

from __future__ import annotations

from disagg.coordinator.core.outbox import Outbox, client_batch, coalesced, node_batch
from disagg.protocol import Accepted, Batch, Finished, Tokens, decode_reply, encode
from disagg.protocol.cluster import NodeBatch, Release, decode_from_coordinator, encode_node


def chunk(rid: str, index: int) -> Tokens:
    return Tokens(request_ids=[rid], indices=[index], token_ids=[index], texts=[str(index)])


def finished(rid: str) -> Finished:
    return Finished(
        request_id=rid, finish_reason="length", token_ids=[], text="", prompt_token_ids=[1]
    )


def test_each_clients_messages_become_one_batch_in_order_and_a_lone_one_stays_itself():
    a, b = b"client-a", b"client-b"
    accepted = Accepted(request_id="r4", prompt_token_ids=[1])
    sends = [
        (a, chunk("r1", 0)),
        (a, chunk("r2", 3)),
        (b, chunk("r7", 0)),
        (a, finished("r1")),
        (a, chunk("r2", 4)),
        (a, accepted),
    ]
    out = dict(coalesced(sends, client_batch))
    assert out[b] == chunk("r7", 0)
    batch = out[a]
    assert isinstance(batch, Batch)
    assert batch.messages == [
        chunk("r1", 0),
        chunk("r2", 3),
        finished("r1"),
        chunk("r2", 4),
        accepted,
    ]
    # What goes on the wire is a valid version-3 reply, read back equal.
    assert decode_reply(encode(batch)) == Batch(messages=batch.messages)


def test_node_messages_become_one_node_batch_per_node():
    out = coalesced([(b"p0", Release(rid=1)), (b"p0", Release(rid=2))], node_batch)
    ((identity, batch),) = out
    assert identity == b"p0" and isinstance(batch, NodeBatch)
    read = decode_from_coordinator(encode_node(batch))
    assert isinstance(read, NodeBatch) and read.messages == [Release(rid=1), Release(rid=2)]


def test_a_connections_tokens_of_one_turn_become_one_tokens_message_where_the_first_was():
    a, b = b"client-a", b"client-b"
    first, second = Outbox(), Outbox()
    first.stream(a).add("r1", 0, 10, "x")
    first.clients.append((a, finished("r0")))
    first.stream(b).add("r7", 3, 70, "")
    first.stream(a).add("r2", 5, 20, "y")
    second.clients.append((a, finished("r1")))  # r1's tokens came first: still before
    second.stream(a).add("r2", 6, 21, "z")  # joins the connection's columns
    turn = Outbox()
    turn.extend(first.take())
    turn.extend(second.take())
    assert not first.streams and not first.clients
    sends = turn.client_sends()
    assert [(identity, m.type) for identity, m in sends] == [
        (a, "tokens"),
        (a, "finished"),
        (b, "tokens"),
        (a, "finished"),
    ]
    assert sends[0][1] == Tokens(
        request_ids=["r1", "r2", "r2"], indices=[0, 5, 6], token_ids=[10, 20, 21],
        texts=["x", "y", "z"],
    )  # fmt: skip
    batch = dict(coalesced(sends, client_batch))[a]
    assert decode_reply(encode(batch)) == Batch(messages=batch.messages)

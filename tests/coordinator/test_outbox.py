"""The shell's merging of streamed chunks: one message per connection, order kept."""

from __future__ import annotations

from disagg.coordinator.core.outbox import coalesced
from disagg.protocol import Accepted, Finished, TokenBatch, Tokens, decode_reply, encode


def chunk(rid: str, index: int) -> Tokens:
    return Tokens(request_id=rid, index=index, token_ids=[index], text=str(index))


def finished(rid: str) -> Finished:
    return Finished(
        request_id=rid, finish_reason="length", token_ids=[], text="", prompt_token_ids=[1]
    )


def test_each_connections_chunks_become_one_batch_and_a_lone_chunk_stays_tokens():
    a, b = b"client-a", b"client-b"
    out = coalesced(
        [(a, chunk("r1", 0)), (b, chunk("r9", 4)), (a, chunk("r2", 0)), (a, chunk("r3", 5))]
    )
    assert [identity for identity, _ in out] == [a, b]
    batch = dict(out)[a]
    assert isinstance(batch, TokenBatch)
    assert [(c.request_id, c.index) for c in batch.chunks] == [("r1", 0), ("r2", 0), ("r3", 5)]
    assert dict(out)[b] == chunk("r9", 4)
    # What goes on the wire is a valid version-2 reply, read back equal.
    assert decode_reply(encode(batch)) == TokenBatch(chunks=batch.chunks)


def test_a_connections_other_messages_never_overtake_its_pending_chunks():
    a, b = b"client-a", b"client-b"
    accepted = Accepted(request_id="r4", prompt_token_ids=[1])
    out = coalesced(
        [
            (a, chunk("r1", 0)),
            (a, chunk("r2", 3)),
            (b, chunk("r7", 0)),
            (a, finished("r1")),
            (a, chunk("r2", 4)),
            (a, accepted),
        ]
    )
    mine = [msg for identity, msg in out if identity == a]
    assert [m.type for m in mine] == ["token_batch", "finished", "tokens", "accepted"]
    assert [c.request_id for c in mine[0].chunks] == ["r1", "r2"]
    assert mine[2] == chunk("r2", 4)
    assert [msg for identity, msg in out if identity == b] == [chunk("r7", 0)]

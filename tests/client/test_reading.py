"""How AsyncClient reads its socket, against a bare ROUTER the test drives by hand: replies
queued while the loop was busy, replies noticed only because of a send, more replies at
once than one reader callback takes, and one ``tokens`` message naming a request twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import zmq

from disagg.client import AsyncClient, ServerUnavailable
from disagg.protocol import Finished, Pong, Tokens, decode_request, encode

# Long enough for a message sent by the ROUTER to reach the client's socket.
_ARRIVAL_S = 0.2


@pytest.fixture
def router() -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    try:
        yield sock
    finally:
        sock.close(linger=0)


def _address(router: zmq.Socket) -> str:
    return router.getsockopt(zmq.LAST_ENDPOINT).decode()


async def _connect(client: AsyncClient, router: zmq.Socket) -> None:
    """A ping answered by hand, so the connection is up before the test sends replies."""
    ping = asyncio.ensure_future(client.ping(timeout=5))
    await asyncio.sleep(0)  # the ping leaves
    assert router.poll(5000), "no ping from the client"
    identity, *frames = router.recv_multipart()
    router.send_multipart([identity, *encode(Pong(nonce=decode_request(frames).nonce))])
    await ping


def _finished(request_id: str, token_ids: list[int]) -> Finished:
    return Finished(
        request_id=request_id,
        finish_reason="length",
        token_ids=token_ids,
        text="",
        prompt_token_ids=[1],
    )


def test_replies_queued_before_a_send_are_read_after_it(run, router):
    # The replies reach the socket while the loop is busy; the send of the request then
    # takes the FD's edge, so only the check after every send can find them. 150 replies
    # are more than one reader callback takes: the rest must follow without a new edge.
    count = 150

    async def main():
        async with AsyncClient(_address(router), timeout=2) as client:
            await _connect(client, router)
            stream = client.stream([1], client_id="c", max_tokens=count)
            rid = stream.request_id
            for i in range(count):
                one = Tokens(request_ids=[rid], indices=[i], token_ids=[i], texts=["x"])
                router.send_multipart([client.routing_id, *encode(one)])
            finished = _finished(rid, list(range(count)))
            router.send_multipart([client.routing_id, *encode(finished)])
            time.sleep(_ARRIVAL_S)  # blocks the loop: nothing reads the socket meanwhile
            return [chunk.index async for chunk in stream], stream.completion

    indices, completion = run(main())
    assert indices == list(range(count))
    assert completion is not None and completion.token_ids == list(range(count))


def test_one_tokens_message_naming_a_request_twice_gives_it_two_chunks(run, router):
    async def main():
        async with AsyncClient(_address(router), timeout=2) as client:
            await _connect(client, router)
            a = client.stream([1], client_id="c", max_tokens=3)
            b = client.stream([1], client_id="c", max_tokens=2)

            async def read(stream):
                return [(c.index, c.token_ids, c.text) async for c in stream]

            reading = asyncio.gather(read(a), read(b))
            for _ in range(2):  # both requests sent
                await asyncio.sleep(0)
                assert router.poll(5000), "a request did not arrive"
                router.recv_multipart()
            ra, rb = a.request_id, b.request_id
            mixed = Tokens(
                request_ids=[ra, ra, rb, ra, rb],
                indices=[0, 1, 0, 2, 1],
                token_ids=[10, 11, 20, 12, 21],
                texts=["a", "b", "c", "", "d"],
            )
            for msg in (mixed, _finished(ra, [10, 11, 12]), _finished(rb, [20, 21])):
                router.send_multipart([client.routing_id, *encode(msg)])
            return await reading

    chunks_a, chunks_b = run(main())
    assert chunks_a == [(0, [10, 11], "ab"), (2, [12], "")]
    assert chunks_b == [(0, [20], "c"), (1, [21], "d")]


def test_requests_past_a_full_pipe_wait_and_leave_in_order_once_it_drains(run, dead_address):
    # Nothing listens yet: ZeroMQ queues 1000 messages (its send HWM), the client keeps the
    # rest, and sends them, in order, once a coordinator appears and the pipe drains.
    count = 1100

    async def main():
        async with AsyncClient(dead_address, timeout=5) as client:
            streams = [client.stream([1], client_id="c", max_tokens=1) for _ in range(count)]
            reading = [asyncio.ensure_future(s.__anext__()) for s in streams]
            await asyncio.sleep(0.05)  # every request submitted
            assert client._outbox, "the pipe took everything; the test needs a fuller one"
            router = zmq.Context.instance().socket(zmq.ROUTER)
            try:
                router.bind(dead_address)
                order = []
                while len(order) < count:
                    await asyncio.sleep(0)  # the client flushes on the loop
                    if router.poll(50):
                        identity, *frames = router.recv_multipart()
                        order.append(decode_request(frames).request_id)
                for rid in order:
                    chunk = Tokens(request_ids=[rid], indices=[0], token_ids=[5], texts=["x"])
                    router.send_multipart([identity, *encode(chunk)])
                chunks = await asyncio.gather(*reading)
            finally:
                router.close(linger=0)
            return [s.request_id for s in streams], order, chunks, list(client._outbox)

    sent, order, chunks, outbox = run(main())
    assert order == sent
    assert [c.token_ids for c in chunks] == [[5]] * count
    assert not outbox


def test_a_request_that_never_left_is_dropped_not_aborted(run, dead_address):
    # 1100 requests to nowhere: the pipe takes the first 1000 (its HWM), so those are
    # aborted (the aborts wait for room); the rest never left, so they are dropped.
    count = 1100

    async def main():
        async with AsyncClient(dead_address, timeout=0.3) as client:
            calls = [client.generate([1], client_id="c") for _ in range(count)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results, [decode_request(frames) for _, frames in client._outbox]

    results, waiting = run(main())
    assert all(isinstance(r, ServerUnavailable) for r in results)
    assert 0 < len(waiting) < count
    assert all(msg.type == "abort" for msg in waiting)

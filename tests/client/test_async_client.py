"""AsyncClient against a scripted fake coordinator, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import gc

import pytest

from disagg.client import (
    AsyncClient,
    Completion,
    InvalidRequest,
    RequestFailed,
    RequestRejected,
    ServerUnavailable,
)
from disagg.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Accepted,
    Batch,
    Error,
    Finished,
    Generate,
)
from tests.client.fake_coordinator import (
    Delay,
    FakeCoordinator,
    Raw,
    echo,
    prompt_ids,
    tokens,
)


def _stall_after_accept(gen: Generate):
    return [Accepted(request_id=gen.request_id, prompt_token_ids=prompt_ids(gen)), Delay(30)]


# -- results -------------------------------------------------------------------------


def test_generate_returns_the_completion(run, fake):
    async def main():
        async with AsyncClient(fake.address, timeout=5, api_key="k") as client:
            out = await client.generate(
                "hello", client_id="alice", max_tokens=3, temperature=0, stop=["x"]
            )
            ids = await client.generate([5, 6, 7], client_id="bob")
        return out, ids

    out, ids = run(main())
    assert isinstance(out, Completion)
    assert out.prompt_token_ids == [ord(c) for c in "hello"]
    assert out.token_ids == [ord("o"), ord("l"), ord("l")]
    assert out.text == "oll"
    assert out.finish_reason == "length"
    assert out.timings.ttft == 0.01 and out.timings.kv_transfer == 0.003
    assert out.nodes.prefill == "prefill-0" and out.nodes.decode == "decode-1"
    assert ids.token_ids == [7, 6, 5] and ids.finish_reason == "stop"
    first, second = fake.requests()
    assert out.request_id == first.request_id != second.request_id
    assert first.client_id == "alice" and first.api_key == "k" and first.stream is False
    assert first.sampling.max_tokens == 3 and first.sampling.temperature == 0
    assert first.sampling.stop == ["x"]
    assert second.prompt == [5, 6, 7]


def test_stream_yields_chunks_in_order_then_the_completion(run, fake):
    async def main():
        async with AsyncClient(fake.address, timeout=5) as client:
            stream = client.stream("abcdefg", client_id="c", max_tokens=7)
            chunks = [chunk async for chunk in stream]
            return chunks, stream

    chunks, stream = run(main())
    assert [c.index for c in chunks] == [0, 2, 4, 6]
    assert [t for c in chunks for t in c.token_ids] == stream.completion.token_ids
    assert "".join(c.text for c in chunks) == "gfedcba" == stream.completion.text
    assert stream.completion.request_id == stream.request_id
    (gen,) = fake.requests()
    assert gen.stream is True
    assert fake.aborted() == set()


def _batched_with_the_first(seen: list[Generate]):
    """Replies as the coordinator batches them: the second request's script sends one
    batch with its acceptance, both streams' chunks (and one for a request the client no
    longer has) and both completions."""

    def script(gen: Generate):
        seen.append(gen)
        accepted = Accepted(request_id=gen.request_id, prompt_token_ids=prompt_ids(gen))
        if len(seen) == 1:
            return [accepted]
        first, second = seen
        chunks = [
            tokens(first.request_id, 0, [65, 66], "AB"),
            tokens("long-gone", 3, [1], "?"),
            tokens(second.request_id, 0, [67], "C"),
        ]
        done = [
            Finished(
                request_id=g.request_id, finish_reason="length", token_ids=ids, text=text,
                prompt_token_ids=prompt_ids(g),
            )
            for g, ids, text in ((first, [65, 66], "AB"), (second, [67], "C"))
        ]  # fmt: skip
        return [Delay(0.01), Batch(messages=[accepted, *chunks, *done])]

    return script


def test_a_batch_reaches_each_request_it_names_in_order(run):
    with FakeCoordinator(_batched_with_the_first([])) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:

                async def read(prompt: str):
                    stream = client.stream(prompt, client_id="c", max_tokens=2)
                    return [(c.index, c.token_ids, c.text) async for c in stream], stream

                first = asyncio.ensure_future(read("one"))
                await fake.await_for(lambda: len(fake.requests()) == 1)
                second = await read("two")
                return await first, second

        (chunks_1, s1), (chunks_2, s2) = run(main())
    assert chunks_1 == [(0, [65, 66], "AB")] and s1.completion.token_ids == [65, 66]
    assert chunks_2 == [(0, [67], "C")] and s2.completion.text == "C"


def _reverse_order(gen: Generate):
    # Later prompts finish first, so replies to the 32 requests interleave.
    steps = echo(gen, jitter=0)
    number = int(gen.prompt.split()[-1])
    return [steps[0], Delay(0.002 * (32 - number)), *steps[1:]]


def test_32_concurrent_generates_complete_with_their_own_results(run):
    with FakeCoordinator(_reverse_order) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                prompts = [f"prompt number {i:02d}" for i in range(32)]
                outs = await asyncio.gather(
                    *(
                        client.generate(p, client_id=f"c{i % 4}", max_tokens=20)
                        for i, p in enumerate(prompts)
                    )
                )
                return prompts, outs, client.in_flight

        prompts, outs, left = run(main())
        for prompt, out in zip(prompts, outs, strict=True):
            assert out.text == prompt[::-1][:20]
            assert out.prompt_token_ids == [ord(c) for c in prompt]
        assert len({o.request_id for o in outs}) == 32
        assert left == 0
        accepted = [rid for kind, rid in fake.sent if kind == "accepted"]
        finished = [rid for kind, rid in fake.sent if kind == "finished"]
        assert sorted(accepted) == sorted(finished) and accepted != finished


def test_concurrent_streams_interleave(run, fake):
    async def consume(client, prompt):
        stream = client.stream(prompt, client_id="c", max_tokens=8)
        return [c async for c in stream], stream.completion

    async def main():
        async with AsyncClient(fake.address, timeout=5) as client:
            return await asyncio.gather(*(consume(client, f"stream-{i}!") for i in range(8)))

    for i, (chunks, completion) in enumerate(run(main())):
        assert "".join(c.text for c in chunks) == f"stream-{i}!"[::-1][:8] == completion.text


# -- errors from the coordinator ------------------------------------------------------


def _error_script(code: str, **fields):
    def script(gen: Generate):
        return [Error(request_id=gen.request_id, code=code, message="it went wrong", **fields)]

    return script


@pytest.mark.parametrize(
    ("code", "fields", "expected"),
    [
        ("invalid_request", {"field": "prompt", "reason": "too long"}, InvalidRequest),
        ("rejected", {"reason": "rate_limit"}, RequestRejected),
        ("unavailable", {}, ServerUnavailable),
        ("failed", {}, RequestFailed),
        ("bad_message", {"reason": "invalid_fields", "field": "sampling.top_k"}, RequestFailed),
    ],
)
def test_each_error_code_raises_its_exception(run, code, fields, expected):
    with FakeCoordinator(_error_script(code, **fields)) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                with pytest.raises(expected) as caught:
                    await client.generate("hi", client_id="c")
                with pytest.raises(expected):
                    async for _ in client.stream("hi", client_id="c"):
                        pass
                return caught.value

        err = run(main())
    if code == "invalid_request":
        assert (err.field, err.reason) == ("prompt", "too long")
    elif code == "rejected":
        assert (err.reason, err.message) == ("rate_limit", "it went wrong")
    elif code == "unavailable":
        assert err.address == fake.address
    else:
        assert "it went wrong" in str(err)
    assert fake.aborted() == set()  # the coordinator ended these: nothing to abort


def test_an_error_not_tied_to_a_request_fails_only_unanswered_ones(run):
    def script(gen: Generate):
        if gen.prompt == "answered":
            return _stall_after_accept(gen)
        return [Delay(0.05), Error(code="bad_message", reason="unsupported_version", message="v?")]

    with FakeCoordinator(script) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                answered = asyncio.create_task(client.generate("answered", client_id="c"))
                await fake.await_for(lambda: len(fake.sent) == 1)
                with pytest.raises(RequestFailed, match="unsupported_version"):
                    await client.generate("unanswered", client_id="c")
                assert not answered.done()
                answered.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await answered

        run(main())


# -- aborts ----------------------------------------------------------------------------


def test_closing_a_stream_early_sends_abort(run):
    with FakeCoordinator(lambda gen: echo(gen, chunk=1, jitter=0.01)) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                # break inside async with
                async with client.stream("abcdefgh", client_id="c", max_tokens=8) as s1:
                    async for _ in s1:
                        break
                # explicit aclose
                s2 = client.stream("abcdefgh", client_id="c", max_tokens=8)
                await s2.__anext__()
                await s2.aclose()
                assert [c async for c in s2] == []  # a closed stream stays ended
                # break and drop the stream without closing it
                s3 = client.stream("abcdefgh", client_id="c", max_tokens=8)
                async for _ in s3:
                    break
                rid3 = s3.request_id
                del s3
                gc.collect()
                assert await fake.await_for(lambda: len(fake.aborted()) == 3)
                assert s1.completion is None
                return {s1.request_id, s2.request_id, rid3}, client.in_flight

        ids, left = run(main())
        assert fake.aborted() == ids
        assert left == 0


def test_cancelling_a_task_sends_abort(run):
    with FakeCoordinator(_stall_after_accept) as fake:

        async def consume_stream(client):
            async for _ in client.stream("s", client_id="c"):
                pass

        async def main():
            async with AsyncClient(fake.address, timeout=20) as client:
                tasks = [
                    asyncio.create_task(client.generate("g", client_id="c")),
                    asyncio.create_task(consume_stream(client)),
                ]
                await fake.await_for(lambda: len(fake.sent) == 2)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                assert all(t.cancelled() for t in tasks)
                assert await fake.await_for(lambda: len(fake.aborted()) == 2)
                return client.in_flight

        assert run(main()) == 0
        assert fake.aborted() == {g.request_id for g in fake.requests()}


def test_close_aborts_requests_in_flight(run):
    with FakeCoordinator(_stall_after_accept) as fake:

        async def main():
            client = AsyncClient(fake.address, timeout=20)
            pending = asyncio.create_task(client.generate("g", client_id="c"))
            await fake.await_for(lambda: len(fake.sent) == 1)
            await client.close()
            with pytest.raises(RequestFailed, match="closed"):
                await pending
            assert client.closed and client._sock.closed
            with pytest.raises(RequestFailed, match="closed"):
                await client.generate("g", client_id="c")
            await client.close()  # idempotent

        run(main())
        assert fake.wait_for(lambda: len(fake.aborted()) == 1)


# -- timeouts --------------------------------------------------------------------------


def test_server_unavailable_when_nothing_listens(run, dead_address):
    async def main():
        async with AsyncClient(dead_address, timeout=0.2) as client:
            with pytest.raises(ServerUnavailable) as caught:
                await client.generate("hi", client_id="c")
            with pytest.raises(ServerUnavailable):
                await client.stream("hi", client_id="c").__anext__()
            with pytest.raises(ServerUnavailable):
                await client.ping(timeout=0.1)
            return caught.value, client.in_flight

    err, left = run(main())
    assert dead_address in str(err) and "0.2 s" in str(err)
    assert err.address == dead_address and err.timeout == 0.2
    assert left == 0


def test_server_unavailable_when_the_coordinator_stops_answering(run, fake):
    async def main():
        async with AsyncClient(fake.address, timeout=5) as client:
            assert (await client.generate("ok", client_id="c")).text == "ko"
            assert await client.ping() > 0
            fake.silent = True
            with pytest.raises(ServerUnavailable, match=r"within 0\.2 s"):
                await client.generate("hi", client_id="c", timeout=0.2)

    run(main())
    silent_request = fake.requests()[-1].request_id
    assert fake.wait_for(lambda: fake.aborted() == {silent_request})


def test_a_request_that_stalls_after_accepted_fails(run):
    with FakeCoordinator(_stall_after_accept) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                with pytest.raises(RequestFailed, match=r"did not finish within 0\.2 s"):
                    await client.generate("hi", client_id="c", timeout=0.2)
                with pytest.raises(RequestFailed, match=r"did not send anything within 0\.2 s"):
                    async for _ in client.stream("hi", client_id="c", timeout=0.2):
                        pass

        run(main())
        assert fake.wait_for(lambda: len(fake.aborted()) == 2)


def test_a_stream_timeout_bounds_each_wait_not_the_whole_stream(run):
    with FakeCoordinator(lambda gen: echo(gen, chunk=1, jitter=0.05)) as fake:

        async def main():
            async with AsyncClient(fake.address) as client:
                stream = client.stream("abcdefgh", client_id="c", max_tokens=8, timeout=0.25)
                return "".join([c.text async for c in stream])  # 8 x 50 ms > 0.25 s

        assert run(main()) == "hgfedcba"


# -- bad replies -----------------------------------------------------------------------


def test_a_malformed_reply_fails_only_its_request(run):
    def script(gen: Generate):
        if gen.prompt == "bad":
            rid = gen.request_id
            payload = (
                b'{"type":"tokens","request_ids":["%s"],"indices":["zero"],"token_ids":[1],'
                b'"texts":[""]}' % rid.encode()
            )
            return [Raw([b"garbage"]), Delay(0.02), Raw([MAGIC, PROTOCOL_VERSION, payload])]
        return echo(gen, jitter=0.05)

    with FakeCoordinator(script) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                good = asyncio.create_task(client.generate("good", client_id="c"))
                with pytest.raises(RequestFailed, match="cannot read") as caught:
                    await client.generate("bad", client_id="c")
                assert (await good).text == "doog"
                after = await client.generate("after", client_id="c")
                return caught.value, after

        err, after = run(main())
        assert after.text == "retfa"
        bad = next(g for g in fake.requests() if g.prompt == "bad")
        assert err.request_id == bad.request_id and "indices" in str(err)
        assert fake.wait_for(lambda: fake.aborted() == {bad.request_id})


def test_a_gap_in_the_stream_fails_the_request(run):
    def script(gen: Generate):
        rid = gen.request_id
        return [
            Accepted(request_id=rid, prompt_token_ids=[1]),
            tokens(rid, 0, [1, 2], "ab"),
            tokens(rid, 3, [4], "d"),
            Delay(30),
        ]

    with FakeCoordinator(script) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                stream = client.stream([1], client_id="c")
                assert (await stream.__anext__()).token_ids == [1, 2]
                with pytest.raises(RequestFailed, match="position 3, expected 2"):
                    await stream.__anext__()

        run(main())
        assert fake.wait_for(lambda: len(fake.aborted()) == 1)


def test_generate_ignores_tokens_and_late_replies(run):
    def script(gen: Generate):
        rid = gen.request_id
        return [
            Accepted(request_id=rid, prompt_token_ids=[1]),
            tokens(rid, 0, [9], "x"),
            Finished(
                request_id=rid, finish_reason="stop", token_ids=[9], text="x", prompt_token_ids=[1]
            ),
            tokens(rid, 1, [9], "x"),
            Finished(
                request_id="someone-else",
                finish_reason="stop",
                token_ids=[],
                text="",
                prompt_token_ids=[1],
            ),
        ]

    with FakeCoordinator(script) as fake:

        async def main():
            async with AsyncClient(fake.address, timeout=5) as client:
                first = await client.generate([1], client_id="c")
                await fake.await_for(lambda: len(fake.sent) == 5)
                second = await client.generate([1], client_id="c")
                return first, second

        first, second = run(main())
        assert first.text == second.text == "x"


# -- local checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "kwargs", "field"),
    [
        ("hi", {"temperature": -1.0}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"stop_token_ids": [-3]}, "stop_token_ids"),
        ("hi", {"temprature": 0.5}, "temprature"),
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ([1, -2], {}, "prompt"),
        ([1, True], {}, "prompt"),
        (b"bytes", {}, "prompt"),
        ("hi", {"client_id": ""}, "client_id"),
        ("hi", {"timeout": 0}, "timeout"),
        ("hi", {"timeout": -1.0}, "timeout"),
    ],
)
def test_bad_arguments_are_refused_before_sending(run, fake, prompt, kwargs, field):
    kwargs = {"client_id": "c", **kwargs}

    async def main():
        async with AsyncClient(fake.address, timeout=5) as client:
            with pytest.raises(InvalidRequest) as caught:
                await client.generate(prompt, **kwargs)
            with pytest.raises(InvalidRequest):
                client.stream(prompt, **kwargs)
            await client.ping()  # anything sent before would have arrived by now
            return caught.value

    err = run(main())
    assert err.field == field
    assert fake.requests() == []


def test_bad_client_settings_are_config_errors():
    from disagg.errors import ConfigError

    with pytest.raises(ConfigError, match="address"):
        AsyncClient("127.0.0.1:5555")
    with pytest.raises(ConfigError, match="address"):
        AsyncClient("tcp://127.0.0.1:notaport")
    with pytest.raises(InvalidRequest, match="timeout"):
        AsyncClient("tcp://127.0.0.1:5555", timeout=0)


def test_a_peer_speaking_another_version_is_told_the_supported_ones(fake):
    import zmq

    from disagg.protocol import decode_reply

    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.connect(fake.address)
        sock.send_multipart([MAGIC, b"1", b'{"type":"ping","request_id":"r2","nonce":"n"}'])
        assert sock.poll(3000), "no reply to a version-1 message"
        reply = decode_reply(sock.recv_multipart())
    finally:
        sock.close(linger=0)
    assert reply.type == "error" and reply.code == "bad_message"
    assert (reply.reason, reply.field, reply.request_id) == ("unsupported_version", "version", "r2")
    assert "supported versions: 3" in reply.message

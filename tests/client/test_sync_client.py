"""The blocking Client: one socket on a private loop thread, shared by many threads."""

from __future__ import annotations

import gc
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from disagg.client import Client, InvalidRequest, RequestFailed, RequestRejected, ServerUnavailable
from disagg.protocol import Accepted, Error, Generate
from tests.client.fake_coordinator import Delay, FakeCoordinator, echo, prompt_ids


def _stall_after_accept(gen: Generate):
    return [Accepted(request_id=gen.request_id, prompt_token_ids=prompt_ids(gen)), Delay(30)]


def test_generate_and_stream(fake):
    with Client(fake.address, timeout=5) as client:
        out = client.generate("hello", client_id="c", max_tokens=4)
        with client.stream("abcdef", client_id="c") as stream:
            chunks = list(stream)
    assert out.text == "olle" and out.prompt_token_ids == [ord(c) for c in "hello"]
    assert [c.index for c in chunks] == [0, 2, 4]
    assert "".join(c.text for c in chunks) == "fedcba" == stream.completion.text
    assert fake.aborted() == set()


def test_eight_threads_share_one_client():
    with (
        FakeCoordinator(lambda gen: echo(gen, jitter=0.003)) as fake,
        Client(fake.address, timeout=5) as client,
    ):
        start = threading.Barrier(8)

        def work(worker: int) -> list[tuple[str, str]]:
            start.wait()
            results = []
            for k in range(4):
                prompt = f"worker {worker} request {k}"
                if k % 2:
                    text = "".join(
                        c.text for c in client.stream(prompt, client_id=f"w{worker}", max_tokens=32)
                    )
                else:
                    text = client.generate(prompt, client_id=f"w{worker}", max_tokens=32).text
                results.append((prompt, text))
            return results

        with ThreadPoolExecutor(8) as pool:
            results = [r for rs in pool.map(work, range(8)) for r in rs]
        assert client._async.in_flight == 0
    assert len(results) == 32
    for prompt, text in results:
        assert text == prompt[::-1]
    assert len({g.request_id for g in fake.requests()}) == 32


def test_errors_reach_the_calling_thread():
    def script(gen: Generate):
        return [
            Error(request_id=gen.request_id, code="rejected", reason="queue_full", message="busy")
        ]

    with FakeCoordinator(script) as fake, Client(fake.address, timeout=5) as client:
        with pytest.raises(RequestRejected, match="queue_full"):
            client.generate("hi", client_id="c")
        with pytest.raises(RequestRejected):
            list(client.stream("hi", client_id="c"))
        with pytest.raises(InvalidRequest) as caught:
            client.generate("hi", client_id="c", top_k=1.5)
        assert caught.value.field == "top_k"
        with pytest.raises(InvalidRequest):
            client.stream("hi", client_id="c", seed="x")
    assert len(fake.requests()) == 2


def test_server_unavailable_when_nothing_listens(dead_address):
    with Client(dead_address, timeout=0.2) as client:
        with pytest.raises(ServerUnavailable, match=re.escape(dead_address)):
            client.generate("hi", client_id="c")
        with pytest.raises(ServerUnavailable):
            client.ping(timeout=0.1)


def test_closing_a_stream_early_sends_abort():
    with (
        FakeCoordinator(lambda gen: echo(gen, chunk=1, jitter=0.01)) as fake,
        Client(fake.address, timeout=5) as client,
    ):
        with client.stream("abcdefgh", client_id="c", max_tokens=8) as s1:
            next(s1)
        s2 = client.stream("abcdefgh", client_id="c", max_tokens=8)
        next(s2)
        s2.close()
        assert list(s2) == []
        s3 = client.stream("abcdefgh", client_id="c", max_tokens=8)
        for _ in s3:
            break
        rid3 = s3.request_id
        del s3
        gc.collect()
        assert fake.wait_for(lambda: fake.aborted() == {s1.request_id, s2.request_id, rid3})


def test_close_from_another_thread_fails_blocked_calls():
    with FakeCoordinator(_stall_after_accept) as fake:
        client = Client(fake.address, timeout=20)
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                client.generate("hi", client_id="c")
            except RequestFailed as e:
                errors.append(e)

        thread = threading.Thread(target=blocked)
        thread.start()
        assert fake.wait_for(lambda: len(fake.sent) == 1)
        client.close()
        thread.join(5)
        assert not thread.is_alive()
        assert len(errors) == 1 and "closed" in str(errors[0])
        assert fake.wait_for(lambda: len(fake.aborted()) == 1)
        with pytest.raises(RequestFailed, match="closed"):
            client.generate("hi", client_id="c")
        with pytest.raises(RequestFailed, match="closed"):
            client.stream("hi", client_id="c")
        client.close()  # idempotent
        assert not client._thread.is_alive()


def test_a_bad_address_is_a_config_error_and_leaves_no_thread():
    from disagg.errors import ConfigError

    before = threading.active_count()
    with pytest.raises(ConfigError, match="address"):
        Client("tcp://127.0.0.1:notaport")
    with pytest.raises(InvalidRequest, match="timeout"):
        Client("tcp://127.0.0.1:5555", timeout=-1)
    assert threading.active_count() == before

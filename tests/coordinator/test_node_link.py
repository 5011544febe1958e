"""The node's side of the node protocol (disagg.node.link.CoordinatorLink) against a bare
ROUTER: what a coordinator sends right behind its Welcome is not lost."""

from __future__ import annotations

import threading

import pytest
import zmq

from disagg.node.link import CoordinatorLink, RegistrationError
from disagg.protocol import Sampling
from disagg.protocol.cluster import (
    PrefillTask,
    Refused,
    Register,
    Welcome,
    decode_from_node,
    encode_node,
)

HELLO = Register(
    node_id="prefill-0", role="prefill", endpoint="prefill-0@0a", model="m", block_size=16,
    capacity_tokens=1024, max_model_len=512, max_batch_tokens=512, pid=1,
)  # fmt: skip


def task(n: int) -> PrefillTask:
    return PrefillTask(
        task=n, rid=n, client_id="c", prompt_token_ids=[1, 2], sampling=Sampling(max_tokens=1),
        counter=0.0, arrival=0.0,
    )  # fmt: skip


def answer_hello(router: zmq.Socket, *replies) -> threading.Thread:
    """Answer the first Register with ``replies``, sent back to back."""

    def run() -> None:
        identity, *frames = router.recv_multipart()
        assert isinstance(decode_from_node(frames), Register)
        for reply in replies:
            router.send_multipart([identity, *encode_node(reply)])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture()
def router():
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)


def test_work_sent_right_behind_the_welcome_is_received(router):
    sock, address = router
    thread = answer_hello(sock, Welcome(node_id="prefill-0"), task(1), task(2))
    link = CoordinatorLink(address, "prefill-0")
    try:
        # Let all three arrive before register reads, so they come in one batch.
        thread.join(timeout=5)
        assert isinstance(link.register(HELLO, timeout=5), Welcome)
        got = link.receive(timeout=1.0)
        while len(got) < 2:
            more = link.receive(timeout=1.0)
            assert more, f"lost: {got}"
            got += more
        assert [m.rid for m in got] == [1, 2]
    finally:
        link.close()


def test_a_refusal_is_a_registration_error_naming_the_reason(router):
    sock, address = router
    answer_hello(sock, Refused(reason="wrong or missing cluster secret"))
    link = CoordinatorLink(address, "prefill-0")
    try:
        with pytest.raises(RegistrationError, match="cluster secret"):
            link.register(HELLO, timeout=5)
    finally:
        link.close()

"""The coordinator over its real sockets, against scripted fake nodes and a real client:
registration, retries ending in the client's exception, malformed node messages, a
restarted node. (The same decisions are tested on the core alone in test_core.py; the
real nodes are exercised in tests/runtime.)"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq

from disagg.client import Client, RequestFailed
from disagg.coordinator.server import Coordinator, CoordinatorSettings
from disagg.engine.worker import resolve_model_dir
from disagg.protocol import Sampling
from disagg.protocol.cluster import (
    NodeBatch,
    Prefilled,
    PrefillResult,
    PrefillTask,
    Refused,
    Register,
    TaskFailed,
    Welcome,
    decode_from_coordinator,
    encode_node,
)


class Running:
    def __init__(self, **settings):
        self.coordinator = Coordinator(
            str(resolve_model_dir("tiny")),
            CoordinatorSettings(
                client_address="tcp://127.0.0.1:*",
                node_address="tcp://127.0.0.1:*",
                dead_after_s=60,
                **settings,
            ),
        )
        self.client_address, self.node_address = self.coordinator.bind()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.coordinator.run(),), daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.coordinator.close(), self.loop).result(10)
        self.thread.join(10)


class FakeNode:
    def __init__(self, address: str, node_id: str, role: str, **register):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.buffered: list = []  # read from a NodeBatch, not yet returned
        fields = dict(
            node_id=node_id, role=role, endpoint=f"{node_id}@0a", model="tiny-test", block_size=16,
            capacity_tokens=4096, max_model_len=1024, max_batch_tokens=4096, pid=1,
        )  # fmt: skip
        fields.update(register)
        self.send(Register(**fields))
        self.welcome = self.recv()

    def send(self, msg) -> None:
        self.sock.send_multipart(encode_node(msg))

    def recv(self, timeout: float = 10.0, skip=("counters",)):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while self.buffered:
                msg = self.buffered.pop(0)
                if msg.type not in skip:
                    return msg
            if self.sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                msg = decode_from_coordinator(self.sock.recv_multipart())
                self.buffered += msg.messages if isinstance(msg, NodeBatch) else [msg]
        raise AssertionError("the coordinator sent nothing")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def running():
    r = Running()
    yield r
    r.close()


def test_wrong_secret_and_other_model_are_refused():
    r = Running(cluster_secret="s3cret-s3cret")
    try:
        bad = FakeNode(r.node_address, "prefill-0", "prefill", secret="nope")
        assert isinstance(bad.welcome, Refused) and "secret" in bad.welcome.reason
        good = FakeNode(r.node_address, "prefill-1", "prefill", secret="s3cret-s3cret")
        assert isinstance(good.welcome, Welcome)
        other = FakeNode(
            r.node_address, "decode-0", "decode", secret="s3cret-s3cret", model="other"
        )
        assert isinstance(other.welcome, Refused) and "model" in other.welcome.reason
        for n in (bad, good, other):
            n.close()
    finally:
        r.close()


def generate_in_background(address: str, **kwargs):
    pool = ThreadPoolExecutor(1)

    def run():
        with Client(address, timeout=30) as client:
            return client.generate("hello", client_id="alice", **kwargs)

    return pool.submit(run)


def test_a_request_failing_on_every_attempt_ends_in_request_failed(running):
    node = FakeNode(running.node_address, "prefill-0", "prefill")
    result = generate_in_background(running.client_address, max_tokens=4)
    for _ in range(running.coordinator.settings.max_attempts):
        task = node.recv()
        assert isinstance(task, PrefillTask)
        node.send(TaskFailed(rid=task.rid, message="the model raised"))
    with pytest.raises(RequestFailed, match="the model raised"):
        result.result(timeout=20)
    assert not running.coordinator.requests
    node.close()


def test_malformed_node_messages_are_dropped_and_service_goes_on(running):
    node = FakeNode(running.node_address, "prefill-0", "prefill")
    node.sock.send_multipart([b"disagg-node", b"2", b"{not json"])
    node.sock.send_multipart([b"garbage"])
    node.sock.send_multipart([b"disagg-node", b"9", b"{}"])
    result = generate_in_background(running.client_address, max_tokens=1)
    task = node.recv()
    assert isinstance(task, PrefillTask) and task.sampling == Sampling(max_tokens=1)
    node.send(
        Prefilled(results=[PrefillResult(rid=task.rid, first_token=3, finish_reason="length", prefill_start=0.0, prefill_s=0.001)])
    )  # fmt: skip
    assert result.result(timeout=20).token_ids == [3]
    node.close()


def test_a_new_process_under_a_live_node_id_replaces_it_and_gets_its_work(running):
    """A node restarted before its heartbeats were missed registers under the same id with
    a new endpoint: the old incarnation is declared gone, its task is dispatched again to
    the new one, and the request completes. A repeated hello of the same incarnation only
    gets another Welcome."""
    first = FakeNode(running.node_address, "prefill-0", "prefill")
    result = generate_in_background(running.client_address, max_tokens=1, temperature=0)
    lost = first.recv()
    assert isinstance(lost, PrefillTask)
    first.close()  # killed: its task is lost with it
    second = FakeNode(running.node_address, "prefill-0", "prefill", endpoint="prefill-0@0b")
    assert isinstance(second.welcome, Welcome)
    again = second.recv()
    assert isinstance(again, PrefillTask) and again.rid == lost.rid
    second.send(
        Prefilled(results=[PrefillResult(rid=again.rid, first_token=7, finish_reason="length", prefill_start=0.0, prefill_s=0.001)])
    )  # fmt: skip
    assert result.result(timeout=20).token_ids == [7]
    node = running.coordinator.nodes["prefill-0"]
    assert node.alive and node.endpoint == "prefill-0@0b"
    repeat = FakeNode(running.node_address, "prefill-0", "prefill", endpoint="prefill-0@0b")
    assert isinstance(repeat.welcome, Welcome)
    assert running.coordinator.nodes["prefill-0"] is node  # the same incarnation
    repeat.close()
    second.close()

"""The coordinator against scripted fake nodes: registration checks, retries, the KV
lease, duplicate token reports, malformed node messages. (The real nodes are exercised
in tests/runtime.)"""

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
    DecodeTask,
    Prefilled,
    PrefillResult,
    PrefillTask,
    Push,
    Refused,
    Register,
    Release,
    SourceLost,
    StepTokens,
    TaskFailed,
    TokenItem,
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
            if self.sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                msg = decode_from_coordinator(self.sock.recv_multipart())
                if msg.type not in skip:
                    return msg
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


def prefilled(rid: int, first_token: int) -> Prefilled:
    """The prefill node's report of ``rid`` prefilled, its first token not the last."""
    return Prefilled(
        results=[
            PrefillResult(rid=rid, first_token=first_token, prefill_start=0.0, prefill_s=0.001)
        ]
    )


def last_token(rid: int, token: int) -> StepTokens:
    """A decode step that produces ``rid``'s second and last token."""
    return StepTokens(
        items=[TokenItem(rid=rid, index=1, token_ids=[token], finish_reason="length")]
    )


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


def test_kv_lease_expiry_releases_and_the_decode_node_recomputes_no_token_repeats():
    r = Running(kv_lease_s=0.3)
    try:
        prefill = FakeNode(r.node_address, "prefill-0", "prefill")
        decode = FakeNode(r.node_address, "decode-0", "decode")
        result = generate_in_background(r.client_address, max_tokens=3, temperature=0)
        task = prefill.recv()
        assert isinstance(task, PrefillTask)
        prefill.send(
            Prefilled(results=[PrefillResult(rid=task.rid, first_token=7, prefill_start=time.monotonic(), prefill_s=0.001)])
        )  # fmt: skip
        work = decode.recv()
        assert isinstance(work, DecodeTask) and work.source == "prefill-0@0a"
        assert work.output_token_ids == [7]
        # nobody pulls: after the lease the holder releases and the decoder is told
        assert isinstance(prefill.recv(), Release)
        assert isinstance(decode.recv(), SourceLost)
        # the decoder recomputes and reports; a repeated report is ignored
        step = StepTokens(items=[TokenItem(rid=work.rid, index=1, token_ids=[8])])
        decode.send(step)
        decode.send(step)
        decode.send(
            StepTokens(items=[TokenItem(rid=work.rid, index=2, token_ids=[9], finish_reason="length")])
        )  # fmt: skip
        done = result.result(timeout=20)
        assert done.token_ids == [7, 8, 9] and done.finish_reason == "length"
        prefill.close()
        decode.close()
    finally:
        r.close()


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


def test_pull_of_a_request_not_held_is_answered_with_source_lost(running):
    prefill = FakeNode(running.node_address, "prefill-0", "prefill")
    decode = FakeNode(running.node_address, "decode-0", "decode")
    result = generate_in_background(running.client_address, max_tokens=2, temperature=0)
    task = prefill.recv()
    prefill.send(prefilled(task.rid, 4))
    work = decode.recv()
    from disagg.protocol.cluster import PullGo, PullRequest

    decode.send(PullRequest(rids=[work.rid, 999_999]))
    replies = [decode.recv(), decode.recv()]
    assert any(isinstance(m, PullGo) and m.rids == [work.rid] for m in replies)
    assert any(isinstance(m, Release) and m.rid == 999_999 for m in replies)
    push = prefill.recv()
    assert isinstance(push, Push) and push.rids == [work.rid] and push.dest == "decode-0@0a"
    decode.send(last_token(work.rid, 5))
    assert result.result(timeout=20).token_ids == [4, 5]
    prefill.close()
    decode.close()


def test_a_source_lost_with_its_pull_under_way_is_told_to_the_decode_node(running):
    """The prefill node holding a request's KV dies after the pull started: the decode
    node is told at once (its receive may otherwise wait out the transfer timeout) and
    the request completes from its recompute there."""
    from disagg.protocol.cluster import PullGo, PullRequest

    prefill = FakeNode(running.node_address, "prefill-0", "prefill")
    decode = FakeNode(running.node_address, "decode-0", "decode")
    result = generate_in_background(running.client_address, max_tokens=2, temperature=0)
    task = prefill.recv()
    prefill.send(prefilled(task.rid, 4))
    work = decode.recv()
    decode.send(PullRequest(rids=[work.rid]))
    assert isinstance(decode.recv(), PullGo)
    assert isinstance(prefill.recv(skip=("counters",)), Push)
    prefill.close()  # killed mid-transfer; a new incarnation declares the old one gone
    again = FakeNode(running.node_address, "prefill-0", "prefill", endpoint="prefill-0@0b")
    lost = decode.recv(skip=("counters",))
    assert isinstance(lost, SourceLost) and lost.rid == work.rid
    decode.send(last_token(work.rid, 5))
    assert result.result(timeout=20).token_ids == [4, 5]
    again.close()
    decode.close()


def test_a_broken_kv_channel_moves_to_the_next_epoch_and_is_given_up_after_three(running):
    """Each break reported by a side moves the pair to the next epoch (the next Push and
    PullGo carry it, so both sides form a fresh channel); after MAX_PAIR_EPOCHS breaks the
    pair is given up: the decode task comes without a source and the prefill node is told
    to release the KV."""
    from disagg.coordinator.server import MAX_PAIR_EPOCHS
    from disagg.protocol.cluster import Pulled, PullGo, PullRequest, Pushed

    prefill = FakeNode(running.node_address, "prefill-0", "prefill")
    decode = FakeNode(running.node_address, "decode-0", "decode")
    for attempt in range(MAX_PAIR_EPOCHS + 1):
        result = generate_in_background(running.client_address, max_tokens=2, temperature=0)
        # (a finished request's Release may reach the prefill node before its Pushed)
        task = prefill.recv(skip=("counters", "release"))
        assert isinstance(task, PrefillTask), task
        prefill.send(prefilled(task.rid, 4))
        work = decode.recv()
        assert isinstance(work, DecodeTask)
        if attempt < MAX_PAIR_EPOCHS:
            assert work.source == "prefill-0@0a"
            decode.send(PullRequest(rids=[work.rid]))
            pull, push = decode.recv(), prefill.recv(skip=("counters", "release"))
            assert isinstance(pull, PullGo) and pull.epoch == attempt
            assert isinstance(push, Push) and push.epoch == attempt
            # Both sides see the channel break; only the first report moves the epoch.
            decode.send(
                Pulled(rids=[work.rid], error="timed out", broken_peer=True,
                       source="prefill-0@0a", epoch=attempt)
            )  # fmt: skip
            prefill.send(
                Pushed(rids=[work.rid], error="closed", broken_peer=True,
                       dest="decode-0@0a", epoch=attempt)
            )  # fmt: skip
        else:  # given up: recompute on the decode node, the held KV released
            assert work.source is None
            release = prefill.recv()
            while isinstance(release, Release) and release.rid != work.rid:
                release = prefill.recv()
            assert isinstance(release, Release) and release.rid == work.rid
        decode.send(last_token(work.rid, 5))
        assert result.result(timeout=20).token_ids == [4, 5]
    assert running.coordinator.pair_epochs[("prefill-0@0a", "decode-0@0a")] == MAX_PAIR_EPOCHS
    prefill.close()
    decode.close()


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

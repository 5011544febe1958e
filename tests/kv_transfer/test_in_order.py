"""The in-order test mode (``kv_transfer.in_order``): over gloo, a pair's operations run
in posting order as NCCL runs them, so the ordering that deadlocked the first NCCL
transfer (a receive of the answer posted before the send that the answer waits for)
deadlocks here too, while plain gloo lets it through. Two threads of this process play
the two endpoints over a real TCPStore and a real gloo pair group."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kv_transfer.errors import KVTransferError, TransferTimeout
from kv_transfer.in_order import ENV_VAR
from kv_transfer.links import PeerLinks
from kv_transfer.pairs import PairGroups, new_endpoint

WAIT_S = 1.0  # per call: short, the deadlocked case waits this long


@pytest.fixture()
def pair():
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    address = f"127.0.0.1:{store.port}"
    a = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=10)
    b = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)
    with ThreadPoolExecutor(2) as pool:
        fa, fb = pool.submit(a.form, b.endpoint), pool.submit(b.form, a.endpoint)
        yield fa.result(timeout=30), fb.result(timeout=30)
    del store


def ask_before_telling(group, peer: int) -> int:
    """The old sender: post the receive of the answer, then send the question."""
    links = PeerLinks(group)
    x = links.begin("q", peer, WAIT_S)
    answer = torch.zeros(1, dtype=torch.int64)
    w_answer = links.irecv(answer, x)
    links.wait(links.isend(torch.tensor([41]), x), x, "question")
    links.wait(w_answer, x, "answer")
    links.close()
    return int(answer)


def answer_after_hearing(group, peer: int) -> int:
    links = PeerLinks(group)
    x = links.begin("q", peer, WAIT_S)
    question = torch.zeros(1, dtype=torch.int64)
    links.wait(links.irecv(question, x), x, "question")
    links.wait(links.isend(question + 1, x), x, "answer")
    links.close()
    return int(question)


def run(pair, asker, answerer):
    (group_a, peer_a), (group_b, peer_b) = pair
    with ThreadPoolExecutor(2) as pool:
        fa, fb = pool.submit(asker, group_a, peer_a), pool.submit(answerer, group_b, peer_b)
        return fa.exception(timeout=30) or fa.result(), fb.exception(timeout=30) or fb.result()


def test_plain_gloo_lets_a_receive_posted_early_through(pair, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert run(pair, ask_before_telling, answer_after_hearing) == (42, 41)


def test_in_nccl_order_a_receive_posted_before_the_send_deadlocks(pair, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    asked, answered = run(pair, ask_before_telling, answer_after_hearing)
    # The question never left: it was queued behind the receive of its own answer.
    assert isinstance(asked, TransferTimeout) and "question" in str(asked)
    assert isinstance(answered, TransferTimeout) and "question" in str(answered)


def test_in_nccl_order_sends_then_receives_go_through(pair, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")

    def tell_then_ask(group, peer: int) -> int:
        links = PeerLinks(group)
        assert links.ordered
        x = links.begin("q", peer, WAIT_S)
        answer = torch.zeros(1, dtype=torch.int64)
        sent = links.isend(torch.tensor([41]), x)
        w_answer = links.irecv(answer, x)  # posted after the send: NCCL runs it after
        links.wait(w_answer, x, "answer")
        assert sent.is_completed()  # in posting order
        links.close()
        return int(answer)

    assert run(pair, tell_then_ask, answer_after_hearing) == (42, 41)


def test_in_nccl_order_a_failed_operation_fails_the_later_ones(pair, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    (group, peer), _ = pair
    links = PeerLinks(group)
    x = links.begin("q", peer, WAIT_S)
    # A send of a non-contiguous tensor is refused by gloo: on the poster's thread.
    bad = links.isend(torch.zeros(4, 4).t(), x)
    later = links.isend(torch.zeros(1), x)
    with pytest.raises(KVTransferError):
        links.wait(bad, x, "bad send")
    with pytest.raises(RuntimeError, match="earlier operation failed"):
        later.wait(timedelta(seconds=WAIT_S))  # never posted to gloo
    links.close()

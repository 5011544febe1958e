"""The coordinator's colocated pool against a scripted colocated node: what it is sent,
when input and output are charged (input once, at the node's ``Admitted``, however
often the request is admitted), and the refusal of a mix at registration."""

from __future__ import annotations

import time

import pytest

from disagg.protocol.cluster import Admitted, DecodeTask, Ending, Refused, StepTokens, Welcome
from tests.coordinator.test_coordinator import FakeNode, Running, generate_in_background


def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def test_input_is_charged_once_at_admission_and_output_per_token():
    r = Running(colocated=True, policy="lcf")  # LCF: counters are the service, no lift
    try:
        node = FakeNode(r.node_address, "colocated-0", "colocated")
        assert isinstance(node.welcome, Welcome)
        result = generate_in_background(r.client_address, max_tokens=2, temperature=0)
        task = node.recv()
        assert isinstance(task, DecodeTask) and task.source is None
        assert task.output_token_ids == []
        ledger = r.coordinator.pools.prefill.ledger
        assert r.coordinator.pools.decode is r.coordinator.pools.prefill  # one pool
        prompt = len(task.prompt_token_ids)
        assert ledger.counters().get("alice", 0.0) == 0.0  # dispatched, not yet admitted

        node.send(Admitted(rids=[task.rid]))
        wait_for(lambda: ledger.counters().get("alice") == prompt, "input is charged")
        node.send(Admitted(rids=[task.rid]))  # admitted again (after a preemption)
        node.send(StepTokens(rids=[task.rid], indices=[0], tokens=[11], texts=["a"]))
        wait_for(lambda: ledger.counters()["alice"] == prompt + 2, "the first token is charged")
        last = Ending(rid=task.rid, finish_reason="length")
        node.send(
            StepTokens(rids=[task.rid], indices=[1], tokens=[12], texts=["b"], finished=[last])
        )
        done = result.result(timeout=20)
        assert done.token_ids == [11, 12] and done.nodes.decode == "colocated-0"
        assert done.text == "ab"  # the node's texts, as it detokenised them
        assert ledger.counters()["alice"] == prompt + 4  # input once, two tokens at w_out 2
        node.close()
    finally:
        r.close()


@pytest.mark.parametrize(
    "colocated_cluster, role", [(True, "prefill"), (True, "decode"), (False, "colocated")]
)
def test_a_node_of_the_other_kind_is_refused_by_name(colocated_cluster, role):
    r = Running(colocated=colocated_cluster)
    try:
        node = FakeNode(r.node_address, f"{role}-0", role)
        assert isinstance(node.welcome, Refused) and "never mixed" in node.welcome.reason
        assert f"{role}-0" not in r.coordinator.nodes
        node.close()
    finally:
        r.close()

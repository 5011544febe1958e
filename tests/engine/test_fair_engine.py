"""The colocated engine under the fair policies: same tokens, fairer order."""

from __future__ import annotations

import pytest

from disagg import LLM, SamplingParams
from disagg.errors import RequestRejectedError
from disagg.scheduling import FairnessConfig


def finish_order(policy: str) -> list[str]:
    # One sequence at a time, so the policy alone decides who goes next.
    llm = LLM("tiny", num_blocks=64, max_num_seqs=1, policy=policy)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i in range(4):
        engine.add_request(
            f"heavy request number {i}", params, client_id="heavy", arrival_time=float(i)
        )
    engine.add_request("light request", params, client_id="light", arrival_time=4.0)
    order = []
    while engine.has_unfinished():
        order += [s.client_id for s in engine.step()]
    return order


def test_vtc_serves_the_light_client_before_the_heavy_backlog():
    assert finish_order("fcfs") == ["heavy"] * 4 + ["light"]
    assert finish_order("vtc").index("light") == 1


def test_policies_change_order_not_tokens():
    prompts = ["one", "two two", "three three three"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {
        policy: [
            o.token_ids
            for o in LLM("tiny", num_blocks=64, policy=policy).generate(
                prompts, params, client_id=["a", "b", "a"]
            )
        ]
        for policy in ("fcfs", "vtc", "lcf")
    }
    assert outs["fcfs"] == outs["vtc"] == outs["lcf"]


def test_rate_limited_request_gets_a_typed_error_and_the_others_run():
    llm = LLM("tiny", num_blocks=64, policy="rpm", fairness=FairnessConfig(rpm_limit=2))
    outs = llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2), client_id="alice")
    assert [o.finish_reason for o in outs] == ["length", "length", "error"]
    assert isinstance(outs[2].error, RequestRejectedError) and outs[2].error.reason == "rate_limit"


def test_vtc_charges_what_the_client_received():
    llm = LLM("tiny", num_blocks=64, policy="vtc")
    outs = llm.generate(
        ["hello there"], SamplingParams(max_tokens=5, ignore_eos=True), client_id="x"
    )
    ledger = llm.engine.scheduler.policy.ledger
    assert ledger.counter("x") == pytest.approx(len(outs[0].prompt_token_ids) + 2 * 5)

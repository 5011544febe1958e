"""The node protocol's frames: a step's tokens travel as columns and come back equal; a
malformed node message is refused with a ``ProtocolError`` naming the field; another
protocol version is refused by name; a batch is its messages, each as it reads alone."""

from __future__ import annotations

import json

import pytest

from disagg.errors import ProtocolError
from disagg.protocol.cluster import (
    NODE_MAGIC,
    NODE_PROTOCOL_VERSION,
    DecodeTask,
    Ending,
    NodeBatch,
    PrefillResult,
    PrefillTask,
    Release,
    StepTokens,
    decode_from_coordinator,
    decode_from_node,
    encode_node,
)
from disagg.protocol.messages import Sampling


def _frames(payload: dict, version: bytes = NODE_PROTOCOL_VERSION) -> list[bytes]:
    return [NODE_MAGIC, version, json.dumps(payload).encode()]


STEP = {
    "type": "step_tokens",
    "rids": [3, 4, 4],
    "indices": [1, 5, 6],
    "tokens": [10, 11, 12],
    "texts": ["a", "", "ü🙂"],
    "finished": [{"rid": 4, "finish_reason": "stop", "text_end": 2}],
    "preempted": [9],
    "step_s": 0.01,
}


def test_a_step_round_trips_as_columns():
    msg = StepTokens(
        rids=[3, 4, 4], indices=[1, 5, 6], tokens=[10, 11, 12], texts=["a", "", "ü🙂"],
        finished=[Ending(rid=4, finish_reason="stop", text_end=2)], preempted=[9], step_s=0.01,
    )  # fmt: skip
    frames = encode_node(msg)
    assert frames[:2] == [NODE_MAGIC, b"4"]
    assert decode_from_node(frames) == msg == decode_from_node(_frames(STEP))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"tokens": [10, 11]}, "tokens has 2 entries, rids 3"),
        ({"texts": ["a"]}, "texts has 1 entries, rids 3"),
        ({"indices": [1, 5, 6, 7]}, "indices has 4 entries, rids 3"),
        ({"tokens": [10, -1, 12]}, "step_tokens.tokens.1"),
        ({"indices": [1, "x", 6]}, "step_tokens.indices.1"),
        ({"texts": ["a", 5, "b"]}, "step_tokens.texts.1"),
        ({"finished": [{"rid": 7, "finish_reason": "stop"}]}, "finished names a rid without"),
        (
            {"finished": [{"rid": 4, "finish_reason": "tired"}]},
            "step_tokens.finished.0.finish_reason",
        ),
        ({"rids": None}, "step_tokens.rids"),
        ({"extra": 1}, "step_tokens.extra"),
    ],
)
def test_a_malformed_step_is_refused_naming_the_field(change, named):
    with pytest.raises(ProtocolError) as info:
        decode_from_node(_frames({**STEP, **change}))
    assert info.value.code == "invalid_fields" and named in str(info.value)


@pytest.mark.parametrize("version", [b"3", b"2", b"5", b""])
def test_another_node_protocol_version_is_refused_by_name(version):
    with pytest.raises(ProtocolError) as info:
        decode_from_node(_frames(STEP, version=version))
    assert info.value.code == "unsupported_version" and "supported: 4" in str(info.value)


def test_the_text_fields_of_prefill_results_and_decode_tasks():
    result = PrefillResult(rid=1, first_token=5, text="hé", prefill_start=0.0, prefill_s=0.1)
    assert result.text == "hé"
    task = DecodeTask(
        task=1, rid=1, client_id="c", prompt_token_ids=[1, 2], output_token_ids=[5],
        sampling=Sampling(), counter=0.0, arrival=0.0, text_chars=2,
    )  # fmt: skip
    assert decode_from_coordinator(encode_node(task)) == task
    bad = json.loads(encode_node(task)[2])
    bad["text_chars"] = -1
    with pytest.raises(ProtocolError, match=r"decode_task\.text_chars"):
        decode_from_coordinator(_frames(bad))


def test_a_batch_carries_each_message_as_it_reads_alone():
    sampling = Sampling(max_tokens=2, stop=["x"])
    msgs = [
        PrefillTask(
            task=1, rid=1, client_id="c", prompt_token_ids=[1, 2], sampling=sampling,
            counter=0.5, arrival=1.0,
        ),
        DecodeTask(
            task=2, rid=2, client_id="c", prompt_token_ids=[3], output_token_ids=[5],
            sampling=sampling, counter=0.0, arrival=0.0, source="p0@0a",
        ),
        Release(rid=3),
    ]  # fmt: skip
    frames = encode_node(NodeBatch(messages=msgs))
    assert decode_from_coordinator(frames) == NodeBatch(messages=msgs)
    payload = json.loads(frames[2])
    assert payload["messages"] == [json.loads(encode_node(m)[2]) for m in msgs]

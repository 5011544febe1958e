"""Frames <-> messages: every type round-trips, and every way a message can be wrong
gives its own ProtocolError code."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.errors import (
    InvalidRequestError,
    ProtocolError,
    RequestRejectedError,
    ServerUnavailable,
)
from disagg.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAGIC,
    PROTOCOL_VERSION,
    Abort,
    Accepted,
    Batch,
    Error,
    Finished,
    Generate,
    Nodes,
    Ping,
    Pong,
    Sampling,
    Timings,
    Tokens,
    decode,
    decode_reply,
    decode_request,
    encode,
    error_from_exception,
    error_reply,
)
from disagg.protocol.cluster import DecodeTask, PrefillTask
from disagg.protocol.messages import made_here
from disagg.sampling_params import SamplingParams

# -- strategies: random valid messages -------------------------------------------------

ids = st.text(min_size=1, max_size=40)
token_ids = st.lists(st.integers(0, 2**31 - 1), max_size=20)
texts = st.text(max_size=60)  # hypothesis text never holds lone surrogates
seconds = st.none() | st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
maybe_text = st.none() | texts

samplings = st.builds(
    Sampling,
    max_tokens=st.integers(-(2**40), 2**40),  # the wire checks types; ranges are to_params'
    temperature=st.floats(-10, 10),
    top_p=st.floats(0, 1),
    top_k=st.integers(-5, 2**31),
    seed=st.none() | st.integers(-(2**63), 2**64 - 1),
    stop=st.lists(texts, max_size=3),
    stop_token_ids=token_ids,
    ignore_eos=st.booleans(),
)
messages = st.one_of(
    st.builds(
        Generate,
        request_id=ids,
        client_id=ids,
        api_key=maybe_text,
        prompt=texts | token_ids,
        sampling=samplings,
        stream=st.booleans(),
    ),
    st.builds(Abort, request_id=ids),
    st.builds(Ping, nonce=ids),
    st.builds(Accepted, request_id=ids, prompt_token_ids=token_ids),
    st.lists(st.tuples(ids, st.integers(0, 2**31), st.integers(0, 2**31), texts), max_size=5).map(
        lambda entries: Tokens(
            request_ids=[e[0] for e in entries],
            indices=[e[1] for e in entries],
            token_ids=[e[2] for e in entries],
            texts=[e[3] for e in entries],
        )
    ),
    st.builds(
        Finished,
        request_id=ids,
        finish_reason=st.sampled_from(["stop", "length", "abort"]),
        token_ids=token_ids,
        text=texts,
        prompt_token_ids=token_ids,
        timings=st.builds(
            Timings,
            queue_s=seconds,
            ttft_s=seconds,
            tpot_s=seconds,
            kv_transfer_s=seconds,
            total_s=seconds,
        ),
        nodes=st.builds(Nodes, prefill=maybe_text, decode=maybe_text),
    ),
    st.builds(
        Error,
        request_id=st.none() | ids,
        code=st.sampled_from(
            ["invalid_request", "rejected", "unavailable", "failed", "bad_message"]
        ),
        field=maybe_text,
        reason=maybe_text,
        message=texts,
    ),
    st.builds(Pong, nonce=ids),
)


single_replies = messages.filter(lambda m: m.type not in ("generate", "abort", "ping"))
messages = st.one_of(messages, st.builds(Batch, messages=st.lists(single_replies, max_size=4)))


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_round_trips(msg):
    frames = encode(msg)
    assert frames[:2] == [MAGIC, PROTOCOL_VERSION]
    assert decode(frames) == msg
    direction = decode_request if msg.type in ("generate", "abort", "ping") else decode_reply
    assert direction(frames) == msg
    # Plain JSON any language reads: the stdlib sees exactly the documented fields.
    assert json.loads(frames[2].decode("utf-8")) == msg.model_dump(mode="json")


def test_sampling_mirrors_sampling_params():
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    wire = Sampling().model_dump()
    assert wire.keys() == defaults.keys()
    for name, value in defaults.items():
        assert wire[name] == (list(value) if isinstance(value, tuple) else value), name
    params = SamplingParams(max_tokens=5, temperature=0, stop=["a"], stop_token_ids=[3], seed=7)
    assert Sampling.from_params(params).to_params() == params


def test_a_generate_with_only_required_fields_gets_the_defaults():
    payload = b'{"type":"generate","request_id":"r","client_id":"c","prompt":"hi"}'
    msg = decode_request([MAGIC, PROTOCOL_VERSION, payload])
    assert msg.sampling == Sampling() and msg.stream is False and msg.api_key is None
    assert msg.sampling.to_params() == SamplingParams()


def test_sampling_values_are_checked_by_to_params_naming_the_field():
    payload = (
        b'{"type":"generate","request_id":"r","client_id":"c","prompt":"hi","sampling":{"top_p":0}}'
    )
    msg = decode_request(
        [MAGIC, PROTOCOL_VERSION, payload]
    )  # well-formed: a request problem, not a wire one
    with pytest.raises(InvalidRequestError) as caught:
        msg.sampling.to_params()
    assert caught.value.field == "top_p"


def test_equal_settings_share_their_checked_params_and_bad_ones_are_refused_each_time():
    from disagg.protocol import messages

    assert (
        Sampling(max_tokens=3, stop=["x"]).to_params()
        is Sampling(max_tokens=3, stop=["x"]).to_params()
    )
    assert Sampling(max_tokens=3, seed=1).to_params().seed == 1
    for _ in range(2):
        with pytest.raises(InvalidRequestError) as caught:
            Sampling(max_tokens=0).to_params()
        assert caught.value.field == "max_tokens"
    for seed in range(messages._MAX_PARAMS + 1):  # distinct seeds: the cache stays bounded
        assert Sampling(seed=seed).to_params().seed == seed
    assert len(messages._PARAMS) <= messages._MAX_PARAMS


# -- every ProtocolError code ----------------------------------------------------------


def _frames(payload: bytes | str, version: bytes = PROTOCOL_VERSION) -> list[bytes]:
    return [MAGIC, version, payload.encode() if isinstance(payload, str) else payload]


def _refused(frames, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode(frames, **kwargs)
    return caught.value


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], "bad_frames"),
        ([MAGIC, b"2"], "bad_frames"),
        ([MAGIC, b"2", b"{}", b"extra"], "bad_frames"),
        ([b"vllm", b"2", b'{"type":"ping","nonce":"n"}'], "wrong_magic"),
        ([b"", b"2", b'{"type":"ping","nonce":"n"}'], "wrong_magic"),
        (_frames('{"type":"ping","nonce":"n"}', version=b"1"), "unsupported_version"),
        (_frames('{"type":"ping","nonce":"n"}', version=b"2"), "unsupported_version"),
        (_frames('{"type":"ping","nonce":"n"}', version=b"4"), "unsupported_version"),
        (_frames('{"type":"ping","nonce":"n"}', version=b""), "unsupported_version"),
        (_frames("{not json"), "not_json"),
        (_frames(b'{"type":"ping","nonce":"\xff"}'), "not_json"),  # not UTF-8
        (_frames(""), "not_json"),
        (_frames("[1, 2]"), "not_json"),
        (_frames('"ping"'), "not_json"),
        (_frames('{"nonce":"n"}'), "unknown_type"),
        (_frames('{"type":"shutdown"}'), "unknown_type"),
        (_frames('{"type":7}'), "unknown_type"),
        (_frames('{"type":"ping"}'), "invalid_fields"),
        (_frames('{"type":"ping","nonce":""}'), "invalid_fields"),
        (_frames('{"type":"ping","nonce":"n","extra":1}'), "invalid_fields"),
    ],
)
def test_each_way_of_being_wrong_has_its_code(frames, code):
    err = _refused(frames)
    assert err.code == code
    assert str(err).startswith(f"{code}: ")


def test_an_unsupported_version_names_the_supported_ones():
    err = _refused(_frames('{"type":"abort","request_id":"r7"}', version=b"1"))
    assert err.field == "version" and err.request_id == "r7"
    assert "'1'" in err.message and "supported versions: 3" in err.message
    reply = error_reply(err)
    assert reply == Error(
        request_id="r7",
        code="bad_message",
        field="version",
        reason="unsupported_version",
        message=err.message,
    )
    # The reply is itself a valid message of the version this side speaks.
    assert decode_reply(encode(reply)) == reply


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        (
            '{"type":"tokens","request_ids":["r"],"indices":["1"],"token_ids":[1],"texts":[""]}',
            "indices.0",
            "integer",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[1.0],"token_ids":[1],"texts":[""]}',
            "indices.0",
            "integer",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[true],"token_ids":[1],"texts":[""]}',
            "indices.0",
            "integer",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[-1],"token_ids":[1],"texts":[""]}',
            "indices.0",
            "greater than or equal to 0",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[0],"token_ids":[-1],"texts":[""]}',
            "token_ids.0",
            "greater than or equal to 0",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[0],"token_ids":[1],"texts":[null]}',
            "texts.0",
            "string",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[0],"token_ids":[1]}',
            "texts",
            "required",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[0, 1],"token_ids":[1],"texts":[""]}',
            "indices",
            "has 2 entries where request_ids has 1",
        ),
        (
            '{"type":"tokens","request_ids":["r"],"indices":[0],"token_ids":[1],"texts":[]}',
            "texts",
            "has 0 entries where request_ids has 1",
        ),
        (
            '{"type":"tokens","request_ids":[""],"indices":[0],"token_ids":[1],"texts":[""]}',
            "request_ids.0",
            "at least 1",
        ),
        (
            '{"type":"generate","request_id":"r","client_id":"c","prompt":[1,"2"]}',
            "prompt",
            "position 1",
        ),
        (
            '{"type":"generate","request_id":"r","client_id":"c","prompt":{"a":1}}',
            "prompt",
            "string or a list",
        ),
        (
            '{"type":"generate","request_id":"r","client_id":"c","prompt":"x","sampling":{"temperature":NaN}}',
            "sampling.temperature",
            "finite",
        ),
        (
            '{"type":"generate","request_id":"r","client_id":"c","prompt":"x","sampling":{"temperature":"0.5"}}',
            "sampling.temperature",
            "number",
        ),
        (
            '{"type":"generate","request_id":"r","client_id":"c","prompt":"x","sampling":{"beam":2}}',
            "sampling.beam",
            "not permitted",
        ),
        (
            '{"type":"generate","request_id":"r","client_id":"c","prompt":"x","stream":"yes"}',
            "stream",
            "boolean",
        ),
        ('{"type":"error","code":"teapot","message":"m"}', "code", "invalid_request"),
        (
            '{"type":"finished","request_id":"r","finish_reason":"stop","token_ids":[],"text":"","prompt_token_ids":[],"timings":{"ttft_s":-1}}',
            "timings.ttft_s",
            "greater than or equal to 0",
        ),
    ],
)
def test_invalid_fields_name_the_field_path(payload, field, words):
    err = _refused(_frames(payload))
    assert err.code == "invalid_fields" and err.field == field
    assert words in err.message and field in err.message
    if '"request_id":"r"' in payload:
        assert err.request_id == "r"


def test_a_message_of_the_other_direction_is_an_unknown_type():
    accepted = encode(Accepted(request_id="r", prompt_token_ids=[1]))
    with pytest.raises(ProtocolError) as caught:
        decode_request(accepted)
    assert (
        caught.value.code == "unknown_type"
        and "'generate', 'abort', 'ping'" in caught.value.message
    )
    assert caught.value.request_id == "r"
    with pytest.raises(ProtocolError, match="unknown_type"):
        decode_reply(encode(Ping(nonce="n")))


def test_the_size_limit_is_configurable_and_checked_before_parsing():
    rid = "req-1"
    head = f'{{"type":"accepted","request_id":"{rid}","prompt_token_ids":['.encode()
    body = b",".join(b"1" for _ in range(DEFAULT_MAX_MESSAGE_BYTES // 2))
    big = head + body + b"]}"
    assert len(big) > DEFAULT_MAX_MESSAGE_BYTES
    err = _refused(_frames(big))
    assert err.code == "oversized" and str(DEFAULT_MAX_MESSAGE_BYTES) in err.message
    assert err.request_id == rid  # read from the head, without parsing the rest
    assert (
        len(decode(_frames(big), max_bytes=len(big)).prompt_token_ids)
        == DEFAULT_MAX_MESSAGE_BYTES // 2
    )
    assert _refused(_frames(big), max_bytes=len(big) - 1).code == "oversized"
    # Oversized garbage is refused as oversized, never parsed.
    assert _refused(_frames(b"\xff" * 100), max_bytes=99).code == "oversized"


def test_encode_refuses_text_that_utf8_cannot_carry():
    with pytest.raises(ProtocolError) as caught:
        encode(
            Finished(
                request_id="r", finish_reason="stop", token_ids=[1], text="\ud800",
                prompt_token_ids=[1],
            )
        )  # fmt: skip
    assert caught.value.code == "invalid_fields" and caught.value.request_id == "r"


def test_unreadable_tokens_name_every_request_they_were_for():
    """So a client fails those requests instead of leaving them waiting."""
    payload = '{"type":"tokens","request_ids":["a","b","a",7],"indices":[0,0,1],"token_ids":[1,2,3],"texts":["","",""]}'
    with pytest.raises(ProtocolError) as caught:
        decode_reply(_frames(payload))
    err = caught.value
    assert err.code == "invalid_fields" and err.field == "request_ids.3"
    assert err.request_ids == ("a", "b") and err.request_id is None


def test_seeds_keep_their_full_64_bit_range():
    for seed in (-(2**63), 2**64 - 1):
        gen = Generate(request_id="r", client_id="c", prompt="x", sampling=Sampling(seed=seed))
        assert decode(encode(gen)).sampling.seed == seed


# -- building replies from exceptions --------------------------------------------------


def test_error_from_exception_maps_each_error_to_its_code():
    invalid = error_from_exception("r", InvalidRequestError("prompt", "is empty"))
    assert (invalid.code, invalid.field, invalid.reason) == (
        "invalid_request",
        "prompt",
        "is empty",
    )
    rejected = error_from_exception("r", RequestRejectedError("rate_limit", "slow down"))
    assert (rejected.code, rejected.reason) == ("rejected", "rate_limit")
    unavailable = error_from_exception("r", ServerUnavailable("no decode nodes", address="x"))
    assert unavailable.code == "unavailable" and unavailable.message == "no decode nodes"
    bad = error_from_exception("r", ProtocolError("not_json", "nope"))
    assert (bad.code, bad.reason, bad.request_id) == ("bad_message", "not_json", "r")
    failed = error_from_exception("r", RuntimeError())
    assert (failed.code, failed.message) == ("failed", "RuntimeError")
    for err in (invalid, rejected, unavailable, bad, failed):
        assert decode_reply(encode(err)) == err


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (Accepted, {"request_id": "r1", "prompt_token_ids": [1, 2]}),
        (PrefillTask, {"task": 1, "rid": 2, "client_id": "c", "prompt_token_ids": [3],
                       "sampling": Sampling(stop=["x"]), "counter": 0.5, "arrival": 1.0}),
        (DecodeTask, {"task": 1, "rid": 2, "client_id": "c", "prompt_token_ids": [3],
                      "output_token_ids": [4], "sampling": Sampling(), "counter": 0.0,
                      "arrival": 1.0, "text_chars": 1}),
    ],
)  # fmt: skip
def test_made_here_builds_what_model_construct_does(cls, values):
    made, constructed = made_here(cls, **values), cls.model_construct(**values)
    assert made == constructed == cls(**values)
    assert repr(made) == repr(constructed)  # the fields in their order, defaults filled
    assert made.model_fields_set == constructed.model_fields_set
    assert made.model_dump_json() == cls(**values).model_dump_json()

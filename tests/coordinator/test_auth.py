"""Who may claim a client: the API-key file, open access, the cluster secret, CurveZMQ."""

from __future__ import annotations

import hashlib
import json

import pytest
import zmq

from disagg.coordinator.auth import (
    ApiKeys,
    ClientIdentity,
    ClientLimits,
    OpenAccess,
    check_cluster_secret,
    make_access,
)
from disagg.errors import AuthenticationError, ConfigError, RequestRejectedError
from disagg.protocol.curve import (
    configure_curve_client,
    configure_curve_server,
    generate_curve_keypair,
)

ALICE_KEY = "sk-alice-0123456789abcdef"
BOB_KEY = "sk-bob-0123456789abcdef"

KEY_FILE = f"""
keys:
  - key: {ALICE_KEY}
    client_id: alice
    weight: 2
    limits:
      max_in_flight_per_client: 8
      max_prompt_tokens: 1024
      max_tokens: 256
      requests_per_minute: 120
  - key_sha256: {hashlib.sha256(BOB_KEY.encode()).hexdigest()}
    client_id: bob
"""


@pytest.fixture
def keys(tmp_path) -> ApiKeys:
    path = tmp_path / "keys.yaml"
    path.write_text(KEY_FILE)
    return ApiKeys.load(path)


def test_key_maps_to_its_client_whatever_client_id_is_claimed(keys):
    alice = keys.resolve(ALICE_KEY, "bob")
    assert alice == ClientIdentity(
        "alice",
        2.0,
        ClientLimits(
            max_in_flight_per_client=8,
            max_prompt_tokens=1024,
            max_tokens=256,
            requests_per_minute=120,
        ),
    )
    bob = keys.resolve(BOB_KEY, "alice")  # the file held only bob's key's digest
    assert bob == ClientIdentity("bob", 1.0, ClientLimits())
    assert keys.weights == {"alice": 2.0, "bob": 1.0}


@pytest.mark.parametrize("api_key", [None, "", "sk-nobody-0123456789abcdef", ALICE_KEY + "x"])
def test_missing_or_unknown_key_is_rejected(keys, api_key):
    with pytest.raises(AuthenticationError) as info:
        keys.resolve(api_key, "alice")
    assert isinstance(info.value, RequestRejectedError)
    assert info.value.reason == "unauthorized"
    assert ALICE_KEY not in str(info.value)


def test_keys_are_not_kept_in_the_clear(keys):
    assert ALICE_KEY not in repr(vars(keys))


def test_describe_says_where_client_ids_come_from(keys, tmp_path):
    assert keys.describe() == f"2 API keys from {tmp_path / 'keys.yaml'}"
    assert OpenAccess().describe() == "client ids are taken as sent: no API-key file configured"


def test_open_access_takes_the_claimed_client_as_sent():
    limits = ClientLimits(max_tokens=64)
    access = OpenAccess(weights={"alice": 3.0}, limits=limits)
    assert access.resolve(None, "alice") == ClientIdentity("alice", 3.0, limits)
    assert access.resolve("any-key", "carol") == ClientIdentity("carol", 1.0, limits)


def test_make_access_picks_by_whether_a_file_is_configured(tmp_path):
    assert isinstance(make_access(None), OpenAccess)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": ALICE_KEY, "client_id": "alice"}]}))
    access = make_access(path)
    assert isinstance(access, ApiKeys)
    assert access.resolve(ALICE_KEY, "x").client_id == "alice"


GOOD = {"key": ALICE_KEY, "client_id": "alice"}


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ([GOOD, {"key": "short", "client_id": "b"}], "keys[1].key"),
        ([GOOD, {"key": 12345678901234567890, "client_id": "b"}], "keys[1].key"),
        ([GOOD, {"key_sha256": "abc", "client_id": "b"}], "keys[1].key_sha256"),
        ([GOOD, {"client_id": "b"}], "keys[1]"),
        ([GOOD, {**GOOD, "key_sha256": "0" * 64}], "keys[1]"),
        ([GOOD, {"key": BOB_KEY}], "keys[1].client_id"),
        ([GOOD, {"key": BOB_KEY, "client_id": ""}], "keys[1].client_id"),
        ([GOOD, {"key": BOB_KEY, "client_id": "x" * 257}], "keys[1].client_id"),
        ([GOOD, {"key": BOB_KEY, "client_id": 7}], "keys[1].client_id"),
        ([GOOD, GOOD, {"key": BOB_KEY, "client_id": "b", "weight": 0}], "keys[2].weight"),
        ([GOOD, GOOD, {"key": BOB_KEY, "client_id": "b", "weight": -1}], "keys[2].weight"),
        ([GOOD, {"key": BOB_KEY, "client_id": "b", "weight": "2"}], "keys[1].weight"),
        ([GOOD, {"key": BOB_KEY, "client_id": "b", "weight": True}], "keys[1].weight"),
        ([GOOD, {"key": BOB_KEY, "client_id": "b", "weight": float("inf")}], "keys[1].weight"),
        ([GOOD, {"key": BOB_KEY, "client_id": "b", "limits": []}], "keys[1].limits"),
        ([GOOD, {"key": BOB_KEY, "client_id": "b", "colour": "red"}], "keys[1].colour"),
        (
            [GOOD, {"key": BOB_KEY, "client_id": "b", "limits": {"max_tokenz": 1}}],
            "keys[1].limits.max_tokenz",
        ),
        *[
            (
                [GOOD, {"key": BOB_KEY, "client_id": "b", "limits": {name: bad}}],
                f"keys[1].limits.{name}",
            )
            for name in (
                "max_in_flight_per_client",
                "max_prompt_tokens",
                "max_tokens",
                "requests_per_minute",
            )
            for bad in (0, 1.5, "8", True)
        ],
        ([GOOD, {"key": ALICE_KEY, "client_id": "b"}], "keys[1].key"),
        ([GOOD, {"key": BOB_KEY, "client_id": "alice", "weight": 2}], "keys[1]"),
        ([], "keys"),
        ("alice", "keys"),
    ],
)
def test_every_bad_field_is_named(tmp_path, entries, field):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    with pytest.raises(ConfigError) as info:
        ApiKeys.load(path)
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_two_keys_for_one_client_are_allowed_when_they_agree():
    keys = ApiKeys.parse({"keys": [GOOD, {"key": BOB_KEY, "client_id": "alice"}]})
    assert keys.resolve(BOB_KEY, "x") == keys.resolve(ALICE_KEY, "y")


@pytest.mark.parametrize(
    ("name", "text", "field"),
    [
        ("keys.yaml", "keys: [", "api_key_file"),
        ("keys.json", "{", "api_key_file"),
        ("keys.yaml", "", "api_key_file"),
        ("keys.yaml", "- a\n- b\n", "api_key_file"),
        ("keys.yaml", "clients: []\n", "clients"),  # the unknown key, before the missing one
        ("keys.yaml", "keys: []\nextra: 1\n", "extra"),
    ],
)
def test_unreadable_files_are_config_errors(tmp_path, name, text, field):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ApiKeys.load(path)
    assert info.value.field == field


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ApiKeys.load(tmp_path / "absent.yaml")


def test_empty_limits_mean_no_limits():
    keys = ApiKeys.parse({"keys": [{**GOOD, "limits": None}]})
    assert keys.resolve(ALICE_KEY, "x").limits == ClientLimits()


@pytest.mark.parametrize(
    ("expected", "offered", "ok"),
    [
        (None, None, True),
        (None, "anything", True),
        ("s3cret", "s3cret", True),
        ("s3cret", "s3cre", False),
        ("s3cret", None, False),
        ("s3cret", "", False),
        ("sécret", "sécret", True),
    ],
)
def test_cluster_secret(expected, offered, ok):
    assert check_cluster_secret(expected, offered) is ok


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_encrypted_pair_talks_and_a_plain_dealer_gets_nothing_through(tmp_path):
    server_keys = generate_curve_keypair(tmp_path / "curve")
    assert server_keys.public_key_file.name == "server.key"
    assert server_keys.secret_key_file.name == "server.key_secret"
    ctx = zmq.Context()
    sockets = []
    try:
        router = ctx.socket(zmq.ROUTER)
        sockets.append(router)
        configure_curve_server(router, server_keys.secret_key_file)
        port = router.bind_to_random_port("tcp://127.0.0.1")

        plain = ctx.socket(zmq.DEALER)
        sockets.append(plain)
        plain.connect(f"tcp://127.0.0.1:{port}")
        plain.send(b"let me in")

        secure = ctx.socket(zmq.DEALER)
        sockets.append(secure)
        configure_curve_client(secure, server_keys.public_key_file)
        secure.connect(f"tcp://127.0.0.1:{port}")
        secure.send(b"hello")

        assert router.poll(5000)
        routing_id, payload = router.recv_multipart()
        assert payload == b"hello"
        router.send_multipart([routing_id, b"welcome"])
        assert secure.poll(5000)
        assert secure.recv() == b"welcome"
        # The plain DEALER's handshake fails; its message never arrives.
        assert router.poll(300) == 0
    finally:
        for sock in sockets:
            sock.close(linger=0)
        ctx.term()


def test_curve_server_needs_the_secret_key_file(tmp_path):
    server_keys = generate_curve_keypair(tmp_path)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(ConfigError, match="no secret key"):
            configure_curve_server(sock, server_keys.public_key_file)
        with pytest.raises(ConfigError, match="cannot read"):
            configure_curve_client(sock, tmp_path / "absent.key")
    finally:
        sock.close(linger=0)
        ctx.term()


def test_the_caps_old_key_is_refused_naming_the_new_one(tmp_path):
    # A file written for the old name must not be served without its limit.
    path = tmp_path / "keys.json"
    entry = {"key": BOB_KEY, "client_id": "b", "limits": {"max_queued_requests": 8}}
    path.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(ConfigError) as info:
        ApiKeys.load(path)
    assert info.value.field == "keys[0].limits.max_queued_requests"
    assert "max_in_flight_per_client" in info.value.reason

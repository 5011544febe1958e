"""Who may claim a client, limits, and the metrics endpoint, through a served system."""

from __future__ import annotations

import urllib.request

import pytest

from disagg import SamplingParams
from disagg.client import Client, RequestRejected
from tests.runtime.conftest import start_cluster

KEYS = """
keys:
  - key: sk-alice-0123456789abcdef
    client_id: alice
    weight: 2
  - key: sk-limited-0123456789abcd
    client_id: limited
    limits:
      requests_per_minute: 2
      max_tokens: 8
"""


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    (tmp / "keys.yaml").write_text(KEYS)
    cluster = start_cluster(tmp, api_keys=str(tmp / "keys.yaml"), metrics_port=0)
    yield cluster
    cluster.stop(drain_timeout=5)


def test_key_decides_the_client_whatever_is_claimed(keyed):
    with Client(keyed.client_address, api_key="sk-alice-0123456789abcdef") as client:
        client.generate("hi", client_id="mallory", max_tokens=2, temperature=0)
    ledger = keyed.coordinator.pools.ledgers[0]
    assert ledger.counter("alice") > 0
    assert ledger.counter("mallory") == 0


@pytest.mark.parametrize("key", [None, "sk-unknown-0123456789abcd"])
def test_missing_or_unknown_key_is_rejected(keyed, key):
    with Client(keyed.client_address, api_key=key) as client:
        with pytest.raises(RequestRejected) as err:
            client.generate("hi", client_id="alice", max_tokens=2)
        assert err.value.reason == "unauthorized"


def test_per_key_limits(keyed):
    with Client(keyed.client_address, api_key="sk-limited-0123456789abcd") as client:
        with pytest.raises(RequestRejected, match="max_tokens"):
            client.generate("hi", client_id="limited", max_tokens=9)
        client.generate("hi", client_id="limited", max_tokens=2, temperature=0)
        client.generate("hi", client_id="limited", max_tokens=2, temperature=0)
        with pytest.raises(RequestRejected) as err:
            client.generate("hi", client_id="limited", max_tokens=2, temperature=0)
        assert err.value.reason == "rate_limit"


def test_metrics_endpoint_reports_requests(keyed):
    with Client(keyed.client_address, api_key="sk-alice-0123456789abcdef") as client:
        client.generate("hello", client_id="alice", max_tokens=3, temperature=0)
    url = f"http://127.0.0.1:{keyed.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    count = [
        line
        for line in text.splitlines()
        if line.startswith("disagg_ttft_seconds_count") and 'client_id="alice"' in line
    ]
    assert count and float(count[0].rsplit(" ", 1)[1]) >= 1, text[:2000]
    assert 'disagg_node_up{node_id="decode-0",role="decode"} 1.0' in text


def test_status_prints_nodes_and_clients(keyed, capsys):
    from disagg.cli import main

    with Client(keyed.client_address, api_key="sk-alice-0123456789abcdef") as client:
        client.generate("hello", client_id="alice", max_tokens=3, temperature=0)
    assert main(["status", "--metrics", f"http://127.0.0.1:{keyed.metrics_port}/metrics"]) == 0
    out = capsys.readouterr().out
    assert "prefill-0" in out and "decode-0" in out and " up" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("alice"))
    assert int(row.split()[1]) >= 1  # finished requests


def test_status_without_a_server_says_so(capsys):
    from disagg.cli import main

    assert main(["status", "--metrics", "http://127.0.0.1:9/metrics"]) == 2
    assert "--metrics-port" in capsys.readouterr().err


def test_curve_encrypted_endpoints(tmp_path, offline):
    from disagg.client import ServerUnavailable
    from disagg.protocol.curve import generate_curve_keypair

    keys = generate_curve_keypair(tmp_path / "curve")
    cluster = start_cluster(tmp_path, curve_secret_key=str(keys.secret_key_file))
    try:
        with Client(cluster.client_address, server_key=str(keys.public_key_file)) as client:
            done = client.generate("hi", client_id="a", max_tokens=4, temperature=0)
        assert (
            done.token_ids
            == offline.generate(["hi"], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
        )
        # no key: the handshake never completes, so nothing is heard
        with Client(cluster.client_address, timeout=2) as plain, pytest.raises(ServerUnavailable):
            plain.generate("hi", client_id="a", max_tokens=2)
    finally:
        cluster.stop(drain_timeout=5)


def test_limits_for_every_client_without_a_key_file(tmp_path):
    import argparse

    from disagg.serve_cli import add_serve_arguments, serve_options

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--max-tokens-limit", "4", "--max-prompt-tokens", "8"])
    options = serve_options(args)
    assert options.client_limits is not None and options.client_limits.max_tokens == 4
    cluster = start_cluster(tmp_path, client_limits=options.client_limits)
    try:
        with Client(cluster.client_address, timeout=30) as client:
            with pytest.raises(RequestRejected) as err:
                client.generate("hi", client_id="anyone", max_tokens=5)
            assert err.value.reason == "max_tokens_limit"
            with pytest.raises(RequestRejected) as err:
                client.generate(list(range(10, 19)), client_id="anyone", max_tokens=2)
            assert err.value.reason == "prompt_too_long"
            ok = client.generate(list(range(10, 18)), client_id="anyone", max_tokens=4)
            assert len(ok.token_ids) >= 1
    finally:
        cluster.stop(drain_timeout=5)

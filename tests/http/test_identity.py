"""Who a request is served as is the coordinator's decision, as for ZeroMQ clients:
without a key file the body's ``user`` (else ``X-Client-Id``, else one anonymous
client); with one, the bearer key alone, and a missing or unknown key is a 401. The
coordinator's own counters (what ``disagg status`` reads) show the client served."""

from __future__ import annotations

import httpx
import openai
import pytest
import yaml

from disagg.status import scrape
from tests.http.conftest import served_with_gateway


def served_as(cluster) -> dict[str, float]:
    samples = scrape(f"http://127.0.0.1:{cluster.metrics_port}/metrics")
    out: dict[str, float] = {}
    for labels, value in samples["disagg_requests_finished_total"]:
        out[labels["client_id"]] = out.get(labels["client_id"], 0.0) + value
    return out


def test_without_a_key_file_user_then_header_then_anonymous(served, model_dir):
    before = served_as(served)
    url = served.gateway.url + "/v1/completions"
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(url, json={**body, "user": "ursula"}).status_code == 200
    assert httpx.post(url, json=body, headers={"X-Client-Id": "harry"}).status_code == 200
    r = httpx.post(url, json={**body, "user": "ursula"}, headers={"X-Client-Id": "harry"})
    assert r.status_code == 200
    assert httpx.post(url, json=body).status_code == 200
    after = served_as(served)
    gained = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k)}
    assert gained == {"ursula": 2.0, "harry": 1.0, "anonymous": 1.0}


KEYS = {
    "alice": "sk-alice-0123456789abcdef",
    "bob": "sk-bob-0123456789abcdef",
    "slow": "sk-slow-0123456789abcdef",
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyed")
    entries = [
        {"key": KEYS["alice"], "client_id": "alice"},
        {"key": KEYS["bob"], "client_id": "bob"},
    ]
    entries.append({"key": KEYS["slow"], "client_id": "slow", "limits": {"requests_per_minute": 1}})
    (tmp / "keys.yaml").write_text(yaml.safe_dump({"keys": entries}))
    cluster = served_with_gateway(
        tmp, "tiny", api_keys=str(tmp / "keys.yaml"), no_node_timeout_s=2.0
    )
    yield cluster
    cluster.stop(drain_timeout=2)


def openai_client(cluster, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.gateway.url + "/v1", api_key=key, max_retries=0)


@pytest.mark.slow
def test_the_key_decides_the_client_whatever_user_says(keyed):
    before = served_as(keyed)
    for who, claims in (("alice", "bob"), ("bob", "alice"), ("alice", None)):
        with openai_client(keyed, KEYS[who]) as c:
            extra = {"user": claims} if claims else {}
            c.completions.create(model="tiny", prompt="hi", max_tokens=2, **extra)
    after = served_as(keyed)
    assert after.get("alice", 0) - before.get("alice", 0) == 2
    assert after.get("bob", 0) - before.get("bob", 0) == 1


@pytest.mark.slow
def test_missing_or_unknown_key_is_a_401(keyed):
    url = keyed.gateway.url + "/v1/completions"
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sk-nobody-0123456789abcdef"},
                    {"Authorization": "Basic abc"}, {"Authorization": "Bearer " + "k" * 5000}):  # fmt: skip
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    with (
        openai_client(keyed, "sk-nobody-0123456789abcdef") as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True)


@pytest.mark.slow
def test_a_rate_limit_is_a_429(keyed):
    with openai_client(keyed, KEYS["slow"]) as c:
        c.completions.create(model="tiny", prompt="hi", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True)
    assert e.value.body["code"] == "rate_limit"


@pytest.mark.slow
def test_no_live_node_is_a_503(keyed):
    # Last in this module: it leaves the cluster without a prefill node.
    keyed.kill_node("prefill-0")
    with openai_client(keyed, KEYS["alice"]) as c, pytest.raises(openai.APIStatusError) as e:
        c.with_options(timeout=60).completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert e.value.status_code == 503
    assert e.value.body["code"] == "unavailable"


@pytest.mark.slow
def test_the_gateway_speaks_to_a_curve_encrypted_coordinator(tmp_path):
    from disagg.coordinator.auth import generate_curve_keypair

    keys = generate_curve_keypair(tmp_path / "curve")
    cluster = served_with_gateway(tmp_path, "tiny", curve_secret_key=str(keys.secret_key_file))
    try:
        with openai_client(cluster, "none") as c:
            out = c.completions.create(model="tiny", prompt="hi", max_tokens=3)
        assert out.usage.completion_tokens == 3
    finally:
        cluster.stop(drain_timeout=2)


def test_a_second_gateway_started_alone_serves_the_same_coordinator(served, model_dir):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "disagg.cli", "http", "--coordinator", served.client_address,
           "--model", str(model_dir), "--port", str(port)]  # fmt: skip
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert second.poll() is None and time.monotonic() < deadline, "it did not start"
            time.sleep(0.1)
        before = served_as(served).get("two-doors", 0.0)
        body = {"prompt": "hi", "max_tokens": 2, "user": "two-doors"}
        for gateway in (served.gateway.url, url):
            assert httpx.post(gateway + "/v1/completions", json=body).status_code == 200
        assert served_as(served)["two-doors"] - before == 2  # one client, whichever door
    finally:
        second.terminate()
        second.wait(timeout=10)

"""Each error status in OpenAI's shape, bad bodies never a 500, and a caller that goes
away mid-request frees its KV on both nodes."""

from __future__ import annotations

import json
import random
import time

import httpx
import openai
import pytest

from disagg.status import scrape


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.gateway.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def name(model_dir) -> str:
    return str(model_dir)


BAD = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "user": "u" * 300}, "user"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": [1] * 5000}, "prompt"),
    ({}, "prompt"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_a_bad_field_is_a_400_naming_it(http, body, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param
    assert error_of(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "hi " * 4000}]}, "messages"),
    ],
)  # fmt: skip
def test_bad_chat_fields_are_400s(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


def test_an_overlong_client_id_header_is_named(http):
    r = http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Client-Id": "h" * 300})
    assert r.status_code == 400 and error_of(r)["param"] == "X-Client-Id"


def test_the_stream_flag_does_not_change_the_status_of_a_refusal(http):
    r = http.post("/v1/completions", json={"prompt": [10**9], "stream": True})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"


def test_unknown_model_is_a_404(base_url):
    with (
        openai.OpenAI(base_url=base_url, api_key="none", max_retries=0) as c,
        pytest.raises(openai.NotFoundError) as e,
    ):
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model"


def test_unknown_route_and_method_are_in_openai_shape(http):
    assert http.get("/v1/nothing").status_code == 404 and error_of(http.get("/v1/nothing"))
    r = http.get("/v1/completions")
    assert r.status_code == 405 and error_of(r)


def test_not_json_and_not_an_object_are_400s(http):
    for raw in (b"{", b"[1, 2]", b"null", b"\xff\xfe", b""):
        r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        error_of(r)


def test_an_oversized_body_is_a_413(http):
    r = http.post("/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413
    error_of(r)

    def chunked():  # no Content-Length: refused as it streams in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'"}'

    r = http.post("/v1/completions", content=chunked())
    assert r.status_code == 413
    error_of(r)


def test_fuzzed_bodies_are_never_a_500_and_the_server_goes_on(http, name):
    rng = random.Random(0)
    values = [None, True, -1, 0, 1, 2**64, 1.5, -0.5, "", "x", [], [1], ["a"], {}, {"a": 1}]
    fields = ["prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
              "stream_options", "user", "top_k", "ignore_eos", "stop_token_ids", "model",
              "messages", "max_completion_tokens", "logprobs"]  # fmt: skip
    for i in range(60):
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(1, 5))}
        route = "/v1/completions" if i % 2 else "/v1/chat/completions"
        if body.get("stream") is True:
            body["max_tokens"] = 2  # keep streams that happen to be valid short
        r = http.post(route, content=json.dumps(body))
        assert r.status_code in (200, 400, 404), (route, body, r.text)
        if r.status_code != 200:
            error_of(r)
    ok = http.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200


def free_kv(cluster) -> dict[str, int]:
    """Each node's free KV tokens, as it last reported them (a decode node keeps one
    block of its own aside, so idle is not always its full capacity)."""
    return {n.node_id: n.free_tokens for n in cluster.coordinator.live_nodes()}


def idle_kv(cluster, timeout: float = 20.0) -> dict[str, int]:
    """The free KV of an idle system: no request known, nothing queued, running or
    held, and the same free tokens in two reports (nodes report at least every 0.5 s,
    so one snapshot may still predate the last release)."""
    c = cluster.coordinator
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        busy = c.requests or any(n.held or n.running or n.queued for n in c.live_nodes())
        now = None if busy else free_kv(cluster)
        if now is not None and now == last:
            return now
        last = now
        time.sleep(0.6)
    raise AssertionError("the served system did not become idle")


def outcomes(cluster, client_id: str) -> dict[str, float]:
    """The coordinator's counts for ``client_id``: arrived, and ended by finish reason or
    error code (an aborted request ends as finished with reason ``abort``)."""
    samples = scrape(f"http://127.0.0.1:{cluster.metrics_port}/metrics")
    out = {}
    for name, key in (("finished", "finish_reason"), ("failed", "code"), ("arrived", None)):
        for labels, value in samples.get(f"disagg_requests_{name}_total", []):
            if labels["client_id"] == client_id:
                out[labels[key] if key else name] = value
    return out


def wait_until(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_frees_the_kv_on_both_nodes(served, http):
    idle = idle_kv(served)
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    body["user"] = "leaves-a-stream"
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        events = [next(lines) for _ in range(6)]  # 3 events, each with a blank line after
        assert all(e.startswith("data: {") for e in events[::2])
        wait_until(lambda: free_kv(served) != idle, "the request holds KV blocks")
    # Leaving the block closed the connection: the gateway aborted the request.
    assert idle_kv(served) == idle
    assert outcomes(served, "leaves-a-stream") == {"arrived": 1.0, "abort": 1.0}


def test_a_client_that_gives_up_on_a_non_streamed_request_frees_it(served):
    idle = idle_kv(served)
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    body["user"] = "gives-up"
    with (
        httpx.Client(base_url=served.gateway.url, timeout=httpx.Timeout(60, read=0.5)) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/v1/completions", json=body)
    assert idle_kv(served) == idle
    assert outcomes(served, "gives-up") == {"arrived": 1.0, "abort": 1.0}


def test_health_and_metrics(http):
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    assert 'disagg_http_requests_total{route="/v1/completions",status="400"}' in text
    assert "disagg_http_streamed_tokens_total" in text


def test_a_gateway_whose_coordinator_is_gone_answers_503(tmp_path, model_dir):
    from disagg.http.process import GatewayProcess

    gw = GatewayProcess(
        "tcp://127.0.0.1:9", str(model_dir), extra_args=["--request-timeout", "1"],
        log_file=tmp_path / "gw.log",
    ).wait_ready(require_coordinator=False)  # fmt: skip
    try:
        with (
            openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0) as c,
            pytest.raises(openai.APIStatusError) as e,
        ):
            c.completions.create(model=str(model_dir), prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(gw.url + "/health").status_code == 503
    finally:
        gw.stop()

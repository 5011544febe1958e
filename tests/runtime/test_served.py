"""The served system end to end: coordinator + prefill + decode node processes + client,
checked against the offline engine (itself checked against transformers)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from disagg import SamplingParams
from disagg.client import AsyncClient, Client, InvalidRequest
from disagg.coordinator.events import EVENTS
from tests.runtime.conftest import start_cluster

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "a",
    "In the beginning there was the word, and the word was with the machine " * 3,
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],  # one token short of a block
    list(range(3, 36)),  # crosses two block boundaries
]


def workload(seed: int = 0, n: int = 12):
    rng = random.Random(seed)
    return [
        (PROMPTS[i % len(PROMPTS)], rng.choice(["alice", "bob", "carol"]), rng.randint(1, 24))
        for i in range(n)
    ]


async def serve_all(address: str, jobs):
    async with AsyncClient(address, timeout=120) as client:
        return await asyncio.gather(
            *(
                client.generate(p, client_id=c, max_tokens=m, temperature=0, ignore_eos=True)
                for p, c, m in jobs
            )
        )


def expected(offline, jobs):
    outs = offline.generate(
        [p for p, _, _ in jobs],
        [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, _, m in jobs],
    )
    return [o.token_ids for o in outs]


def test_greedy_equals_offline_1p1d(cluster, offline):
    jobs = workload()
    done = asyncio.run(serve_all(cluster.client_address, jobs))
    assert [c.token_ids for c in done] == expected(offline, jobs)
    for c, (_, _, m) in zip(done, jobs, strict=True):
        assert c.finish_reason == "length" and len(c.token_ids) == m
        assert c.nodes.prefill == "prefill-0"
        assert c.timings.ttft is not None and c.timings.ttft > 0
        if m > 1:  # its KV moved (a failed pull would have recomputed it: no transfer time)
            assert c.nodes.decode == "decode-0" and c.timings.tpot is not None
            assert c.timings.kv_transfer is not None


def test_greedy_equals_offline_2p2d(tmp_path, offline):
    jobs = workload(seed=1, n=16)
    with start_cluster(tmp_path, prefill=2, decode=2) as served:
        done = asyncio.run(serve_all(served.client_address, jobs))
    assert [c.token_ids for c in done] == expected(offline, jobs)
    used = {c.nodes.decode for c in done if c.nodes.decode}
    assert used <= {"decode-0", "decode-1"}
    assert all(c.timings.kv_transfer is not None for c in done if c.nodes.decode)


def test_stream_has_no_gap_or_repeat_and_matches_completion(cluster, offline):
    with Client(cluster.client_address, timeout=60) as client:
        stream = client.stream("Hello there", client_id="dave", max_tokens=17, temperature=0)
        chunks = list(stream)
        done = stream.completion
    # No gap, no repeat: a chunk (one token, or several that arrived in one message)
    # starts where the chunks before it end.
    with_tokens = [c for c in chunks if c.token_ids]
    starts = [sum(len(c.token_ids) for c in with_tokens[:i]) for i in range(len(with_tokens))]
    assert [c.index for c in with_tokens] == starts
    assert all(c.index == len(done.token_ids) for c in chunks if not c.token_ids)
    assert [t for c in chunks for t in c.token_ids] == done.token_ids
    assert (
        done.token_ids
        == offline.generate(["Hello there"], SamplingParams(max_tokens=17, temperature=0))[
            0
        ].token_ids
    )
    assert (
        done.text
        == offline.generate(["Hello there"], SamplingParams(max_tokens=17, temperature=0))[0].text
    )


def test_seeded_sampling_is_reproducible_through_two_nodes(cluster, offline):
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    with Client(cluster.client_address, timeout=60) as client:
        a = client.generate("Once upon a time", client_id="x", **params)
        b = client.generate("Once upon a time", client_id="y", **params)
    assert a.token_ids == b.token_ids
    ref = offline.generate(["Once upon a time"], SamplingParams(**params))[0]
    assert a.token_ids == ref.token_ids


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ],
)
def test_bad_request_names_the_field_and_server_goes_on(cluster, sampling, field):
    with Client(cluster.client_address, timeout=30) as client:
        with pytest.raises(InvalidRequest) as err:
            client.generate("hi", client_id="eve", **sampling)
        assert field in (err.value.field or "")
        ok = client.generate("hi", client_id="eve", max_tokens=3, temperature=0)
        assert len(ok.token_ids) >= 1


def test_prompt_too_long_and_bad_token_ids_are_refused(cluster):
    with Client(cluster.client_address, timeout=30) as client:
        with pytest.raises(InvalidRequest, match="prompt"):
            client.generate(list(range(5000)), client_id="eve", max_tokens=2)
        with pytest.raises(InvalidRequest, match="prompt"):
            client.generate([1, 2, 10**7], client_id="eve", max_tokens=2)


def test_each_finished_request_is_appended_to_the_events_log(cluster):
    """--events-log: the line is in the file when the client has its completion, with the
    request's path through both nodes and a breakdown whose phases fit in its total."""
    with Client(cluster.client_address, timeout=60) as client:
        done = client.generate(
            "events, please", client_id="events-reader", max_tokens=5, ignore_eos=True
        )
    path = cluster.options.events_log
    lines = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]
    (line,) = [x for x in lines if x["client_id"] == "events-reader"]
    assert line["request_id"] == done.request_id  # what the client can match on
    names = [e["event"] for e in line["events"]]
    assert names == [e for e in EVENTS if e != "failed"]  # every event, in order
    nodes = {e["event"]: e["node_id"] for e in line["events"]}
    assert nodes["prefill_start"] == done.nodes.prefill and nodes["decode_end"] == done.nodes.decode
    b = line["breakdown"]
    assert 0 < b["prefill"] + b["transfer"] + b["decode"] <= b["total"]
    assert abs(b["total"] - done.timings.total) < 0.05


def test_abort_frees_kv_on_both_nodes(cluster):
    async def run():
        async with AsyncClient(cluster.client_address, timeout=60) as client:
            stream = client.stream(
                "Once upon a time", client_id="frank", max_tokens=400, ignore_eos=True
            )
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break
            await stream.aclose()
        return seen

    assert asyncio.run(run()) == 3
    coordinator = cluster.coordinator
    wait_until(lambda: not coordinator.requests, "the aborted request is forgotten")
    wait_until(
        lambda: (
            all(not (n.held or n.running or n.queued) for n in coordinator.live_nodes())
            and all(n.free_tokens == n.capacity_tokens for n in coordinator.live_nodes("prefill"))
        ),
        "both nodes report their blocks free",
    )


def wait_until(cond, what: str, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def test_small_pools_preempt_and_back_pressure_without_changing_outputs(tmp_path, offline):
    """12 blocks (192 tokens) per node for 8 requests of ~90 tokens: the decode node must
    preempt (recompute) and the prefill node fills with unpulled KV; outputs still equal
    the offline engine's."""
    jobs = [(PROMPTS[i % 3], f"c{i % 2}", 70) for i in range(8)]
    cluster = start_cluster(tmp_path, num_blocks=12)
    try:
        done = asyncio.run(serve_all(cluster.client_address, jobs))
        preemptions = cluster.metrics.render().decode()
    finally:
        cluster.stop(drain_timeout=5)
    assert [c.token_ids for c in done] == expected(offline, jobs)
    count = sum(
        float(line.rsplit(" ", 1)[1])
        for line in preemptions.splitlines()
        if line.startswith("disagg_preemptions_total")
    )
    assert count >= 1, "the decode pool was large enough: nothing was preempted"


def test_cuda_without_a_gpu_is_refused_before_anything_starts():
    """With fewer GPUs than nodes the nodes share them (tests/test_gpus.py); with none,
    nothing starts."""
    import torch

    from disagg.errors import ConfigError
    from disagg.serve import ServedCluster, ServeOptions

    cluster = ServedCluster(ServeOptions(port=0, device="cuda", prefill=1, decode=1))
    if torch.cuda.device_count() >= 1:
        pytest.skip("this machine has a GPU: the nodes share it")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        cluster.start()
    assert not cluster.processes


def test_streamed_text_adds_up_and_stop_strings_cut_like_offline(cluster, offline):
    ref = offline.generate(["Once upon a time"], SamplingParams(max_tokens=40, temperature=0))[0]
    stop = ref.text[len(ref.text) // 2 :][:3]  # a string the output is known to contain
    with Client(cluster.client_address, timeout=60) as client:
        stream = client.stream("Once upon a time", client_id="g", max_tokens=40, temperature=0)
        chunks = list(stream)
        assert "".join(c.text for c in chunks) == stream.completion.text == ref.text
        cut = client.generate(
            "Once upon a time", client_id="g", max_tokens=40, temperature=0, stop=[stop]
        )
    want = offline.generate(
        ["Once upon a time"], SamplingParams(max_tokens=40, temperature=0, stop=[stop])
    )[0]
    assert (cut.text, cut.token_ids, cut.finish_reason) == (
        want.text,
        want.token_ids,
        want.finish_reason,
    )
    assert cut.finish_reason == "stop" and stop not in cut.text


def test_external_nodes_join_with_the_printed_commands(tmp_path, offline):
    """`--external-nodes`: the server prints each node's command line, an operator runs
    them (here: as local processes), and they join through the printed addresses."""
    import os
    import shlex
    import subprocess
    import sys
    import threading
    import time

    from disagg.serve import ServedCluster, ServeOptions

    cluster = ServedCluster(
        ServeOptions(port=0, external_nodes=True, num_blocks=64, startup_timeout=120)
    )
    printed: list[str] = []
    cluster.announce = printed.append
    procs: list[subprocess.Popen] = []

    def operator() -> None:  # waits for the printed commands, then runs them
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = [line.strip() for line in printed if line.strip().startswith("python -m ")]
            if len(lines) == 2:
                for line in lines:
                    argv = shlex.split(line)
                    argv[0] = sys.executable
                    env = {**os.environ, "OMP_NUM_THREADS": "1"}
                    procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
                return
            time.sleep(0.05)

    threading.Thread(target=operator, daemon=True).start()
    cluster.start()
    try:
        with Client(cluster.client_address, timeout=60) as client:
            done = client.generate("Hello there", client_id="a", max_tokens=6, temperature=0)
        want = offline.generate(["Hello there"], SamplingParams(max_tokens=6, temperature=0))
        assert done.token_ids == want[0].token_ids
        assert not cluster.processes  # nothing was started by the server itself
        assert all("--model tiny" in line for line in printed[1:])
    finally:
        cluster.stop(drain_timeout=5)
        for p in procs:
            p.wait(timeout=30)
    assert all(p.returncode == 0 for p in procs)

"""Nodes killed mid-run (SIGKILL: no goodbye). Every accepted request either completes
with the right tokens or fails with a typed error; streams never repeat or skip."""

from __future__ import annotations

import asyncio
import time

import pytest

from disagg import SamplingParams
from disagg.client import AsyncClient, ServerUnavailable
from disagg.coordinator.tracked import Phase
from tests.runtime.conftest import start_cluster
from tests.runtime.test_served import wait_until

PROMPTS = ["Once upon a time", "The capital of France is", "a b c d e f g", "Hello there"]


async def stream_all(cluster, jobs, kill, when):
    """Streams every job; calls ``kill()`` once ``when(coordinator)`` holds."""

    async def one(client, prompt, max_tokens):
        chunks = []
        stream = client.stream(
            prompt, client_id=f"c{len(prompt) % 3}", max_tokens=max_tokens, temperature=0,
            ignore_eos=True,
        )  # fmt: skip
        async for chunk in stream:
            chunks.append(chunk)
        return chunks, stream.completion

    async def killer():
        deadline = time.monotonic() + 30
        while not when(cluster.coordinator) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        kill()

    async with AsyncClient(cluster.client_address, timeout=120) as client:
        results = await asyncio.gather(
            *(one(client, p, m) for p, m in jobs), killer(), return_exceptions=True
        )
    return results[:-1]


def check_streams(results, jobs, offline):
    refs = offline.generate(
        [p for p, _ in jobs],
        [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in jobs],
    )
    for (chunks, done), ref in zip(results, refs, strict=True):
        # no gap, no repeat: each chunk starts where the previous ones end
        starts = [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
        assert [c.index for c in chunks] == starts and all(c.token_ids for c in chunks)
        assert [t for c in chunks for t in c.token_ids] == done.token_ids
        assert done.token_ids == ref.token_ids
        # The nodes' texts, across the hand-off from prefill and the resume after a
        # death, add up to the whole output decoded at once, which is the final text.
        assert "".join(c.text for c in chunks) == done.text == ref.text


def check_resumed_on(results, jobs, offline, moved: set[str], survivor: str) -> None:
    """Every stream completed right (``check_streams``), and the requests that were
    mid-stream on the lost node (at least two) finished on ``survivor``."""
    assert all(not isinstance(r, BaseException) for r in results), results
    check_streams(results, jobs, offline)
    assert len(moved) >= 2
    finished_on = {done.request_id: done.nodes.decode for _, done in results}
    assert all(finished_on[rid] == survivor for rid in moved)  # resumed elsewhere


def decoding_on(node_id: str, at_least: int):
    def cond(coordinator) -> bool:
        busy = [
            t
            for t in coordinator.requests.values()
            if t.phase is Phase.DECODING and t.decode_node == node_id and t.num_output_tokens > 3
        ]
        return len(busy) >= at_least

    return cond


def test_decode_node_killed_mid_stream_requests_resume_elsewhere(tmp_path, offline):
    cluster = start_cluster(tmp_path, prefill=1, decode=2)
    try:
        jobs = [(PROMPTS[i % 4], 80) for i in range(8)]
        moved: set[str] = set()

        def kill() -> None:  # note who was mid-stream on decode-0, then kill it
            moved.update(
                t.request_id
                for t in cluster.coordinator.requests.values()
                if t.decode_node == "decode-0"
            )
            cluster.kill_node("decode-0")

        results = asyncio.run(stream_all(cluster, jobs, kill, decoding_on("decode-0", 2)))
        check_resumed_on(results, jobs, offline, moved, "decode-1")
        assert not cluster.coordinator.nodes["decode-0"].alive
    finally:
        cluster.stop(drain_timeout=5)


def test_prefill_node_killed_requests_are_prefilled_again(tmp_path, offline):
    cluster = start_cluster(tmp_path, prefill=2, decode=1)
    try:
        jobs = [(PROMPTS[i % 4] * (1 + i % 5), 30) for i in range(16)]

        def some_at_prefill_1(coordinator) -> bool:
            return any(
                t.prefill_node == "prefill-1" and t.phase is not Phase.QUEUED
                for t in coordinator.requests.values()
            )

        results = asyncio.run(
            stream_all(cluster, jobs, lambda: cluster.kill_node("prefill-1"), some_at_prefill_1)
        )
        assert all(not isinstance(r, BaseException) for r in results), results
        check_streams(results, jobs, offline)
        wait_until(lambda: not cluster.coordinator.nodes["prefill-1"].alive, "prefill-1 is dead")
    finally:
        cluster.stop(drain_timeout=5)


def test_no_decode_node_left_fails_with_server_unavailable(tmp_path):
    cluster = start_cluster(tmp_path, prefill=1, decode=1, no_node_timeout_s=2.0)
    try:
        jobs = [(PROMPTS[i % 4], 200) for i in range(4)]
        started = time.monotonic()
        results = asyncio.run(
            stream_all(
                cluster, jobs, lambda: cluster.kill_node("decode-0"), decoding_on("decode-0", 1)
            )
        )
        assert time.monotonic() - started < 30  # bounded: never hangs
        assert results and all(isinstance(r, ServerUnavailable) for r in results), results
        assert not cluster.coordinator.requests
    finally:
        cluster.stop(drain_timeout=2)


def test_a_dead_node_is_started_again_and_pairs_afresh(tmp_path, offline):
    """The only decode node dies mid-stream: the supervisor starts it again, the streams
    resume on the new process (no gap, no repeat, tokens equal offline), and the new
    incarnation pulls KV from the surviving prefill node over a freshly formed pair."""
    cluster = start_cluster(tmp_path, prefill=1, decode=1, restart_nodes=True)
    try:
        old_endpoint = cluster.coordinator.nodes["decode-0"].endpoint
        jobs = [(PROMPTS[i % 4], 120) for i in range(4)]
        results = asyncio.run(
            stream_all(
                cluster, jobs, lambda: cluster.kill_node("decode-0"), decoding_on("decode-0", 1)
            )
        )
        assert all(not isinstance(r, BaseException) for r in results), results
        check_streams(results, jobs, offline)
        assert len(cluster.restarts["decode-0"]) == 1
        node = cluster.coordinator.nodes["decode-0"]
        assert node.alive and node.endpoint != old_endpoint

        async def fresh():
            async with AsyncClient(cluster.client_address, timeout=60) as client:
                return await client.generate(
                    PROMPTS[1], client_id="after", max_tokens=12, temperature=0, ignore_eos=True
                )

        done = asyncio.run(fresh())
        ref = offline.generate(
            [PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        )[0]
        assert done.token_ids == ref.token_ids
        assert done.nodes.decode == "decode-0" and done.timings.kv_transfer is not None
    finally:
        cluster.stop(drain_timeout=5)


@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_stop_drains_in_flight_requests(tmp_path, sig):
    cluster = start_cluster(tmp_path)

    async def run():
        async with AsyncClient(cluster.client_address, timeout=60) as client:
            task = asyncio.create_task(
                client.generate("Once upon a time", client_id="a", max_tokens=40, ignore_eos=True)
            )
            await asyncio.sleep(0.3)
            loop = asyncio.get_running_loop()
            failed = await loop.run_in_executor(None, cluster.stop, 20.0)
            return failed, await task

    failed, done = asyncio.run(run())
    assert failed == 0 and len(done.token_ids) == 40
    assert all(p.poll() == 0 for p in cluster.processes.values())

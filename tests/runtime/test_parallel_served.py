"""Nodes as rank groups, served: prefill and decode nodes of different tensor/pipeline
layouts (each a leader process and tp x pp gloo rank processes), KV handed rank pair by
rank pair between the layouts. Outputs through the client equal the offline engine
(itself equal to transformers) for concurrent requests of several clients; a decode
rank killed mid-stream is its node lost, and every accepted request still completes
with the right tokens."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from disagg import SamplingParams
from disagg.client import Client
from tests.runtime.conftest import start_cluster
from tests.runtime.test_failures import PROMPTS, check_resumed_on, decoding_on, stream_all
from tests.runtime.test_served import expected, serve_all, wait_until, workload


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [((2, 1), (1, 2)), ((1, 1), (2, 1)), ((1, 2), (2, 1))],
    ids=["tp2-to-pp2", "tp1-to-tp2", "pp2-to-tp2"],
)
def test_greedy_equals_offline_across_layouts(tmp_path, offline, prefill, decode):
    jobs = workload(seed=3, n=10)
    seeded = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    with start_cluster(tmp_path, layouts={"prefill": prefill, "decode": decode}) as served:
        done = asyncio.run(serve_all(served.client_address, jobs))
        with Client(served.client_address, timeout=60) as client:
            sampled = client.generate("Once upon a time", client_id="x", **seeded)
        nodes = served.coordinator.nodes
        assert (nodes["prefill-0"].layout, nodes["decode-0"].layout) == (prefill, decode)
        # Every request ended and freed its blocks: the nodes' credit shows a full pool.
        wait_until(
            lambda: all(n.running == n.held == n.queued == 0 for n in nodes.values()),
            "every node is idle with nothing held",
        )
    assert [c.token_ids for c in done] == expected(offline, jobs)
    # The seeded stream goes on across the hand-off as in one process (the driver rank
    # skips the draws the first token took on the prefill node).
    ref = offline.generate(["Once upon a time"], SamplingParams(**seeded))[0]
    assert sampled.token_ids == ref.token_ids
    moved = [c for c in done if c.nodes.decode]
    assert moved and all(c.timings.kv_transfer is not None for c in moved)  # pulled, not recomputed
    assert {c.nodes.decode for c in moved} == {"decode-0"}


def test_a_colocated_tp2_node_equals_offline(tmp_path, offline):
    jobs = workload(seed=4, n=8)
    with start_cluster(
        tmp_path, prefill=0, decode=0, colocated=1, layouts={"colocated": (2, 1)}
    ) as served:
        done = asyncio.run(serve_all(served.client_address, jobs))
        assert served.coordinator.nodes["colocated-0"].layout == (2, 1)
    assert [c.token_ids for c in done] == expected(offline, jobs)


def rank_pids(leader_pid: int) -> list[int]:
    """The rank processes a node's leader started (its children)."""
    pids: list[int] = []
    for task in Path(f"/proc/{leader_pid}/task").iterdir():
        text = (task / "children").read_text().split()
        pids += [int(p) for p in text]
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_decode_rank_killed_mid_stream_is_its_node_lost_and_requests_resume(tmp_path, offline):
    cluster = start_cluster(tmp_path, prefill=1, decode=2, layouts={"decode": (2, 1)})
    try:
        leader = cluster.processes["decode-0"]
        ranks = rank_pids(leader.pid)
        assert len(ranks) == 2, ranks
        jobs = [(PROMPTS[i % 4], 64) for i in range(8)]
        moved: set[str] = set()

        def kill() -> None:  # note who was mid-stream on decode-0, then kill one rank
            moved.update(
                t.request_id
                for t in cluster.coordinator.requests.values()
                if t.decode_node == "decode-0"
            )
            os.kill(ranks[1], signal.SIGKILL)

        results = asyncio.run(stream_all(cluster, jobs, kill, decoding_on("decode-0", 2)))
        check_resumed_on(results, jobs, offline, moved, "decode-1")
        wait_until(lambda: not cluster.coordinator.nodes["decode-0"].alive, "decode-0 is lost")
        assert leader.wait(timeout=30) == 1  # the leader stopped: its node is lost
        wait_until(
            lambda: all(not Path(f"/proc/{p}").exists() for p in ranks), "its ranks are gone"
        )
    finally:
        cluster.stop(drain_timeout=5)

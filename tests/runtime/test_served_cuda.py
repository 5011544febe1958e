"""The served system on one GPU: a prefill and a decode node share it, so they move KV
over CUDA IPC (NCCL refuses two ranks on one device), each taking half of the memory;
greedy outputs equal the offline engine's on the same GPU. Skipped without CUDA."""

from __future__ import annotations

import asyncio

import pytest

from disagg import LLM, SamplingParams
from tests.runtime.conftest import start_cluster
from tests.runtime.test_served import serve_all, workload

pytestmark = pytest.mark.cuda


def offline_on_cuda(jobs) -> list[list[int]]:
    """The offline engine's greedy tokens for ``jobs`` on the GPU, in float32."""
    offline = LLM("tiny", device="cuda", dtype="float32", num_blocks=192)
    want = offline.generate(
        [p for p, _, _ in jobs],
        [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, _, m in jobs],
    )
    return [o.token_ids for o in want]


def test_one_gpu_prefill_and_decode_over_cuda_ipc_equal_the_offline_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_LOG_LEVEL", "INFO")  # nodes log the transport of each pair
    jobs = workload(seed=3, n=12)
    # num_blocks None: each node sizes its pool from its half of the GPU.
    with start_cluster(tmp_path, device="cuda", dtype="float32", num_blocks=None) as served:
        assert served._gpus == {"prefill-0": [0], "decode-0": [0]}
        done = asyncio.run(serve_all(served.client_address, jobs))
    assert [c.token_ids for c in done] == offline_on_cuda(jobs)
    moved = [c for c in done if c.nodes.decode]
    assert moved and all(c.timings.kv_transfer is not None for c in moved)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert "over cuda_ipc" in logs["decode-0.log"], logs["decode-0.log"][-2000:]
    assert "over cuda_ipc" in logs["prefill-0.log"], logs["prefill-0.log"][-2000:]


def test_rank_groups_on_gpus_hand_kv_over_nccl_between_layouts(tmp_path, monkeypatch):
    """A prefill node of tp 2 and a decode node of pp 2, one GPU per rank (4 GPUs): the
    KV moves rank pair by rank pair over NCCL; greedy output equals the offline engine."""
    import torch

    if torch.cuda.device_count() < 4:
        pytest.skip(f"needs 4 GPUs (one per rank); {torch.cuda.device_count()} visible")
    monkeypatch.setenv("DISAGG_LOG_LEVEL", "INFO")
    jobs = workload(seed=5, n=12)
    layouts = {"prefill": (2, 1), "decode": (1, 2)}
    with start_cluster(
        tmp_path, device="cuda", dtype="float32", num_blocks=192, layouts=layouts
    ) as served:
        assert served._gpus == {"prefill-0": [0, 1], "decode-0": [2, 3]}
        done = asyncio.run(serve_all(served.client_address, jobs))
    assert [c.token_ids for c in done] == offline_on_cuda(jobs)
    assert all(c.timings.kv_transfer is not None for c in done if c.nodes.decode)

"""Device handling that decides what runs on a GPU, checked without one: graph buckets,
when decode may be captured as CUDA graphs, and that threads touching CUDA make the
model's device current first."""

from __future__ import annotations

import threading

import pytest
import torch

from disagg.engine.cuda_graphs import batch_size_buckets
from disagg.engine.device import decode_graphs_refusal, device_thread_pool, make_current
from disagg_kernels import kernel_backend


@pytest.mark.parametrize(
    "max_num_seqs, expected",
    [
        (1, [1]),
        (6, [1, 2, 4, 6]),
        (20, [1, 2, 4, 8, 16, 20]),  # a full batch of 20 has its own graph
        (48, [1, 2, 4, 8, 16, 32, 48]),
    ],
)
def test_buckets_always_end_at_max_num_seqs(max_num_seqs, expected):
    assert batch_size_buckets(max_num_seqs) == expected


def test_graphs_are_captured_only_with_triton_kernels_on_cuda():
    cuda = torch.device("cuda", 0)
    with kernel_backend("auto"):
        assert decode_graphs_refusal(cuda, enforce_eager=False) is None
        assert "enforce_eager" in decode_graphs_refusal(cuda, enforce_eager=True)
        assert "no CUDA graphs" in decode_graphs_refusal("cpu", enforce_eager=False)
    with kernel_backend("torch"):  # its attention syncs the host: capture would fail
        assert "synchronises" in decode_graphs_refusal(cuda, enforce_eager=False)


def test_worker_threads_make_the_device_current_before_any_work(monkeypatch):
    made_current: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda d: made_current.append((threading.current_thread().name, torch.device(d))),
    )
    pool = device_thread_pool(torch.device("cuda", 1), "model")
    try:
        name = pool.submit(lambda: threading.current_thread().name).result(timeout=10)
    finally:
        pool.shutdown()
    assert made_current == [(name, torch.device("cuda", 1))] and name.startswith("model")
    make_current("cpu")  # nothing to make current off CUDA
    assert len(made_current) == 1

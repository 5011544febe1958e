"""GPU backends: CUDA IPC between two processes on one GPU, NCCL between two GPUs, and
the local backend on CUDA caches (Triton gather/scatter). Skipped without CUDA; run on a
GPU machine with ``pytest -m cuda tests/kv_transfer``."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import (
    KVPoolHandle,
    LocalBackend,
    LocalHub,
    TransferChecksumError,
    TransferGroup,
    TransferMismatch,
    make_backend,
)
from tests.kv_transfer._caches import (
    assert_blocks_equal,
    assert_untouched,
    bits,
    random_cache,
    tiny_spec,
)
from tests.kv_transfer._pair import run_pair

pytestmark = pytest.mark.cuda

TIMEOUT = 10.0
SRC_IDS, DST_IDS = [9, 2, 30, 4, 17], [1, 22, 3, 8, 5]
TOKENS = 70  # 5 blocks of 16


def ipc_scenario(rank: int, group: TransferGroup) -> str:
    spec = tiny_spec(torch.bfloat16)
    corrupt = {"on": False}

    def flip(layer: int, buf: torch.Tensor) -> None:  # runs on the receiver for CUDA IPC
        if corrupt["on"] and layer == 1:
            buf.view(torch.int16).view(-1)[3] ^= 1

    if rank == 0:
        src = random_cache(spec, 32, seed=1, device="cuda")
        backend = make_backend("cuda_ipc", device="cuda", pool=src.data, checksums=True)
        group.store.set("test/pool", backend.export_pool().to_bytes())
        backend.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=TIMEOUT)
        with pytest.raises(TransferMismatch):
            backend.send("r2", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=TIMEOUT)
        with pytest.raises(TransferChecksumError):
            backend.send("r3", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=TIMEOUT)
        group.store.wait(["test/released"])  # keep the pool alive while it is mapped
        return "sent"
    dst = random_cache(spec, 24, seed=2, device="cuda")
    backend = make_backend("cuda_ipc", device="cuda", checksums=True, on_layer_staged=flip)
    handle = KVPoolHandle.from_bytes(group.store.get("test/pool"))
    backend.attach_peer_pool(0, handle)
    peer_pool = backend.peer_pool(0)
    before = dst.data.clone()
    backend.recv("r1", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=TIMEOUT)
    for i in range(spec.num_layers):
        for kv in (0, 1):
            assert torch.equal(bits(dst.data[i, kv, DST_IDS]), bits(peer_pool[i, kv, SRC_IDS]))
    assert_untouched(before, dst, except_ids=DST_IDS)
    before = dst.data.clone()
    with pytest.raises(TransferMismatch):
        backend.recv("other", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=TIMEOUT)
    assert_untouched(before, dst)
    corrupt["on"] = True
    with pytest.raises(TransferChecksumError) as err:
        backend.recv("r3", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=TIMEOUT)
    assert err.value.layer == 1
    backend.close()
    del peer_pool
    torch.cuda.synchronize()
    group.store.set("test/released", "1")
    return "received"


def nccl_scenario(rank: int, group: TransferGroup) -> int:
    spec = tiny_spec(torch.float16)
    device = f"cuda:{rank}"
    src = random_cache(spec, 32, seed=1, device=device)
    dst = random_cache(spec, 24, seed=2, device=device)
    backend = make_backend("nccl", device=device, checksums=True)
    for n in range(3):
        if rank == 0:
            backend.send(f"r{n}", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=TIMEOUT)
        else:
            backend.recv(f"r{n}", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=TIMEOUT)
            expected = random_cache(spec, 32, seed=1, device=device)  # rank 0's source
            assert_blocks_equal(expected, SRC_IDS, dst, DST_IDS)
    backend.close()
    return 3


def test_cuda_ipc_between_two_processes_on_one_gpu():
    assert run_pair(ipc_scenario, deadline_s=120) == ["sent", "received"]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_nccl_between_two_gpus():
    assert run_pair(nccl_scenario, backend="nccl", deadline_s=120) == [3, 3]


def test_local_backend_on_cuda_caches():
    spec = tiny_spec(torch.bfloat16)
    src = random_cache(spec, 32, seed=1, device="cuda")
    dst = random_cache(spec, 24, seed=2, device="cuda")
    before = dst.data.clone()
    hub = LocalHub()
    sender, receiver = LocalBackend(hub, 0, checksums=True), LocalBackend(hub, 1, checksums=True)
    sender.send("r", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=TIMEOUT)
    receiver.recv("r", dst.layers, torch.tensor(DST_IDS), 0, num_tokens=TOKENS, timeout=TIMEOUT)
    assert_blocks_equal(src, SRC_IDS, dst, DST_IDS)
    assert_untouched(before, dst, except_ids=DST_IDS)

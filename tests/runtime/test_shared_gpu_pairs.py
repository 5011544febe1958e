"""Nodes on one GPU move KV over CUDA IPC, chosen by the nodes themselves: while a pair
forms, the two endpoints swap device identities through the store, and a pair on one
GPU becomes a gloo group for CUDA IPC's control messages, with the pools' handles
swapped too (``kv_transfer.pairs``); ``pair_backend`` then builds the CUDA IPC backend
with the peer's pool mapped. Without a GPU the identities are made up and each "mapped"
pool is the other side's CPU tensor (CUDA IPC's protocol runs on CPU shared pools), so
everything but the mapping itself runs here."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from disagg.node.transfers import TransferThreads, pair_backend, rank_endpoint
from kv_transfer import CudaIpcBackend, P2PBackend
from kv_transfer.pairs import PairGroups, new_endpoint, pair_transport
from tests.kv_transfer._caches import assert_blocks_equal, node_layout, random_cache, tiny_spec

GPU_A, GPU_B = "cuda:GPU-8d2f", "cuda:GPU-11c0"


@pytest.fixture()
def address():
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    yield f"127.0.0.1:{store.port}"
    del store


def test_only_caches_on_one_gpu_pick_cuda_ipc():
    assert pair_transport("nccl", GPU_A, GPU_A) == "cuda_ipc"
    assert pair_transport("nccl", GPU_A, GPU_B) == "nccl"
    assert pair_transport("gloo", "cpu", "cpu") == "gloo"  # CPU memory is not shared this way
    assert pair_transport("gloo", "", "") == "gloo"


def form_both(a: PairGroups, b: PairGroups):
    with ThreadPoolExecutor(2) as pool:
        fa, fb = pool.submit(a.form, b.endpoint), pool.submit(b.form, a.endpoint)
        return fa.result(timeout=30), fb.result(timeout=30)


@pytest.mark.parametrize("same_gpu", [True, False], ids=["one-gpu", "two-gpus"])
def test_the_pair_swaps_identities_and_on_one_gpu_its_pool_handles(address, same_gpu):
    a = PairGroups(
        address, new_endpoint("prefill-0"), "gloo", 10, device_id=GPU_A, share=lambda: b"pool-a"
    )
    b = PairGroups(
        address,
        new_endpoint("decode-0"),
        "gloo",
        10,
        device_id=GPU_A if same_gpu else GPU_B,
        share=lambda: b"pool-b",
    )
    (group_a, _), (group_b, _) = form_both(a, b)
    assert group_a.name == group_b.name == "gloo"  # CUDA IPC's control runs over gloo
    if same_gpu:
        assert group_a.transport == group_b.transport == "cuda_ipc"
        assert (group_a.peer_share, group_b.peer_share) == (b"pool-b", b"pool-a")
    else:
        assert group_a.transport == group_b.transport == "gloo"
        assert group_a.peer_share == group_b.peer_share == b""


def test_nodes_on_one_gpu_move_kv_over_cuda_ipc(address):
    spec = tiny_spec(torch.bfloat16)
    caches = {b"pool-0": random_cache(spec, 12, seed=1), b"pool-1": random_cache(spec, 12, seed=2)}
    built: list[object] = []
    sides = []
    endpoints: list[str] = []
    for i, share in enumerate(caches):
        cache = caches[share]
        endpoints.append(new_endpoint(f"node-{i}"))
        pairs = PairGroups(
            address,
            rank_endpoint(endpoints[-1], 0),
            "gloo",
            10,
            device_id=GPU_A,
            share=lambda s=share: s,
        )

        def make(group, cache=cache):
            backend = pair_backend(
                group,
                device=torch.device("cpu"),
                pool=cache.data,
                checksums=True,
                open_pool=lambda shared: caches[shared].data,  # the peer's pool, "mapped"
            )
            built.append(backend)
            return backend

        sides.append(TransferThreads(pairs, make, cache, node_layout(spec), 0, timeout=10))
    sender, receiver = sides
    try:
        sender.send((7,), [3, 9, 1], endpoints[1], 0)
        receiver.recv((7,), [0, 4, 11], endpoints[0], 0)
        done = []
        deadline = time.monotonic() + 30
        while len(done) < 2 and time.monotonic() < deadline:
            done += sender.completed() + receiver.completed()
            time.sleep(0.01)
        assert [d.error for d in done] == [None, None], done
        assert {d.stats.backend for d in done} == {"cuda_ipc"}
        assert all(isinstance(b, CudaIpcBackend) for b in built) and len(built) == 2
        assert_blocks_equal(caches[b"pool-0"], [3, 9, 1], caches[b"pool-1"], [0, 4, 11])
    finally:
        for side in sides:
            side.close()


def test_nodes_on_different_devices_keep_p2p(address):
    a = PairGroups(address, new_endpoint("prefill-0"), "gloo", 10, device_id="cpu")
    b = PairGroups(address, new_endpoint("decode-0"), "gloo", 10, device_id="cpu")
    (group, _), _ = form_both(a, b)
    cache = random_cache(tiny_spec(), 4, seed=1)
    backend = pair_backend(group, device=torch.device("cpu"), pool=cache.data, checksums=False)
    assert isinstance(backend, P2PBackend) and backend.name == "gloo"
    backend.close()

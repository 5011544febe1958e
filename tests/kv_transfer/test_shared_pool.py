"""The CUDA IPC backend's protocol without a GPU: two processes, the sender's pool in CPU
shared memory (attached as a tensor where a GPU would open an IPC handle), control
messages over gloo. Covers source block ids in the header extension, chunked copies from
the peer's pool, checksums checked on the receiver, and a rejected header."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import CudaIpcBackend, TransferChecksumError, TransferGroup, TransferMismatch
from tests.kv_transfer._caches import assert_untouched, bits, random_cache, tiny_spec
from tests.kv_transfer._pair import run_pair

TIMEOUT = 5.0
SRC_IDS, DST_IDS = [9, 2, 30, 4, 17], [1, 22, 3, 8, 5]
TOKENS = 70  # 5 blocks of 16


def shared_pool(rank: int, group: TransferGroup, pool: torch.Tensor) -> list[str]:
    spec = tiny_spec(torch.bfloat16)
    src_layers = [(pool[i, 0], pool[i, 1]) for i in range(spec.num_layers)]
    outcomes = []
    if rank == 0:
        backend = CudaIpcBackend(None, "cpu", pool=pool, checksums=True)
        for rid in ("r1", "r2", "r3", "r4"):
            try:
                backend.send(rid, src_layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=TIMEOUT)
                outcomes.append("ok")
            except (TransferMismatch, TransferChecksumError) as e:
                outcomes.append(type(e).__name__)
        return outcomes
    corrupt = {"on": False}

    def flip(layer: int, buf: torch.Tensor) -> None:  # on the receiver for this backend
        if corrupt["on"] and layer == 2:
            buf.view(torch.int16).view(-1)[3] ^= 1

    dst = random_cache(spec, 24, seed=2)
    # Chunks of 3 layers (of 4): the last chunk holds one layer.
    layer_bytes = 2 * len(DST_IDS) * 16 * 2 * 32 * 2
    backend = CudaIpcBackend(
        None, "cpu", checksums=True, on_layer_staged=flip, chunk_bytes=3 * layer_bytes
    )
    backend.attach_peer_pool(0, pool)
    before = dst.data.clone()
    backend.recv("r1", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=TIMEOUT)
    for i in range(spec.num_layers):
        for kv in (0, 1):
            assert torch.equal(bits(dst.data[i, kv, DST_IDS]), bits(pool[i, kv, SRC_IDS]))
    assert_untouched(before, dst, except_ids=DST_IDS)
    outcomes.append("ok")
    before = dst.data.clone()
    with pytest.raises(TransferMismatch) as err:
        backend.recv("r2", dst.layers, DST_IDS, 0, num_tokens=TOKENS - 1, timeout=TIMEOUT)
    assert err.value.field == "num_tokens"
    assert_untouched(before, dst)
    outcomes.append("TransferMismatch")
    dst.data.copy_(before)
    corrupt["on"] = True
    with pytest.raises(TransferChecksumError) as err:
        backend.recv("r3", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=TIMEOUT)
    assert (err.value.layer, err.value.written_layers) == (2, 2)
    assert_untouched(before, dst, except_ids=DST_IDS, layers=range(2))
    outcomes.append("TransferChecksumError")
    corrupt["on"] = False
    backend.recv("r4", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=TIMEOUT)
    outcomes.append("ok")
    backend.close()
    return outcomes


def test_shared_pool_protocol_between_two_processes():
    pool = random_cache(tiny_spec(torch.bfloat16), 32, seed=1).data.share_memory_()
    sender, receiver = run_pair(shared_pool, pool=pool)
    assert sender == receiver == ["ok", "TransferMismatch", "TransferChecksumError", "ok"]

"""The gloo backend between two real processes (world size 2 on localhost).

Each test is one scenario run by both ranks (see ``_pair.py``): rank 0 holds the prefill
cache and sends, rank 1 holds the decode cache and receives. The scenarios assert inside
the children; a failure comes back as the child's traceback.
"""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer import (
    KVTransferError,
    TransferChannelError,
    TransferChecksumError,
    TransferGroup,
    TransferMismatch,
    TransferTimeout,
    make_backend,
)
from kv_transfer.header import OPENING_MESSAGE_BYTES
from tests.kv_transfer._caches import (
    assert_blocks_equal,
    assert_untouched,
    random_cache,
    tiny_spec,
)
from tests.kv_transfer._pair import run_pair

# Each test runs over plain gloo and over gloo in NCCL's order (conftest.py).
pytestmark = pytest.mark.usefixtures("message_order")

TIMEOUT = 5.0  # per transfer; generous for 2 busy cores, far below the pair deadline


def _ids(seed: int, pool: int, n: int) -> list[int]:
    """n distinct, shuffled block ids, the same in both processes."""
    return torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n].tolist()


# -- scenarios (module level: spawned children import them) ----------------------------


def back_to_back(rank: int, group: TransferGroup) -> list[int]:
    spec = tiny_spec()
    src, dst = random_cache(spec, 48, seed=1), random_cache(spec, 40, seed=2)
    wide = tiny_spec(torch.bfloat16, num_layers=2, num_kv_heads=4, head_dim=64)
    src_bf16, dst_bf16 = random_cache(wide, 280, seed=3), random_cache(wide, 300, seed=4)
    requests = [
        ("req-a", 55, spec),  # 4 blocks, the last one partly filled
        (7, 16, spec),  # exactly one block; an int request id
        ("req-c", 300, spec),  # 19 blocks
        ("req-bf16", 100, wide),  # another layout over the same channel
        # 270 blocks: 8.4 MiB, too big for the opening message: layer messages, pipelined
        ("req-large", 270 * 16, wide),
        ("req-d", 33, spec),  # small again after the large one
    ]
    backend = make_backend("gloo", group=None)
    seen = []
    for n, (rid, tokens, s) in enumerate(requests):
        blocks = -(-tokens // s.block_size)
        (a, b) = (src, dst) if s is spec else (src_bf16, dst_bf16)
        src_ids, dst_ids = _ids(10 + n, a.num_blocks, blocks), _ids(20 + n, b.num_blocks, blocks)
        if rank == 0:
            stats = backend.send(rid, a.layers, src_ids, 1, num_tokens=tokens, timeout=TIMEOUT)
        else:
            before = b.data.clone()
            stats = backend.recv(rid, b.layers, dst_ids, 0, num_tokens=tokens, timeout=TIMEOUT)
            assert_blocks_equal(a, src_ids, b, dst_ids)
            assert_untouched(before, b, except_ids=dst_ids)
        assert stats.seq == n and stats.num_blocks == blocks
        assert len(stats.layer_done_s) == s.num_layers
        seen.append(stats.bytes)
    backend.close()
    return seen


def mismatches(rank: int, group: TransferGroup) -> list[str]:
    spec = tiny_spec()
    src, dst = random_cache(spec, 16, seed=1), random_cache(spec, 16, seed=2)
    src_bf16 = random_cache(tiny_spec(torch.bfloat16), 16, seed=3)
    # 6 layers of 1.5 MiB for 6 blocks: 9 MiB, too big for the opening message, so sent
    # as 6 layer messages after the header, all to be drained by the rejecting receiver.
    src_wide = random_cache(
        tiny_spec(torch.bfloat16, num_layers=6, num_kv_heads=32, head_dim=128), 8, seed=4
    )
    src_ids, dst_ids = [3, 11, 5], [9, 0, 14]
    #          sender (rid, tokens, cache)   receiver (rid, tokens)   field
    cases = [
        (("m1", 40, src), ("m1", 33), "num_tokens"),
        (("other", 40, src), ("m2", 40), "request_id"),
        (("m3", 40, src_bf16), ("m3", 40), "dtype"),
        (("m4", 96, src_wide), ("m4", 96), "num_layers"),
    ]
    backend = make_backend("gloo")
    fields = []
    for (s_rid, s_tok, cache), (r_rid, r_tok), field in cases:
        if rank == 0:
            ids = src_ids if cache is not src_wide else [3, 1, 0, 7, 5, 2]
            with pytest.raises(TransferMismatch) as err:
                backend.send(s_rid, cache.layers, ids, 1, num_tokens=s_tok, timeout=TIMEOUT)
            assert err.value.rejected_by_peer
        else:
            before = dst.data.clone()
            ids = dst_ids if r_tok <= 48 else [9, 0, 14, 3, 8, 1]
            with pytest.raises(TransferMismatch) as err:
                backend.recv(r_rid, dst.layers, ids, 0, num_tokens=r_tok, timeout=TIMEOUT)
            assert not err.value.rejected_by_peer
            assert_untouched(before, dst)
        assert err.value.field == field
        fields.append(err.value.field)
    # The channel is still in step: the next transfer goes through.
    if rank == 0:
        backend.send("ok", src.layers, src_ids, 1, num_tokens=40, timeout=TIMEOUT)
    else:
        backend.recv("ok", dst.layers, dst_ids, 0, num_tokens=40, timeout=TIMEOUT)
        assert_blocks_equal(src, src_ids, dst, dst_ids)
    backend.close()
    return fields


def corrupted_layer(rank: int, group: TransferGroup, blocks: int) -> int:
    spec = tiny_spec()
    pool = blocks + 13
    src, dst = random_cache(spec, pool, seed=1), random_cache(spec, pool, seed=2)
    src_ids, dst_ids = _ids(1, pool, blocks), _ids(2, pool, blocks)
    tokens = 16 * blocks - 8
    corrupt = {"on": True}

    def flip_one_value(layer: int, buf: torch.Tensor) -> None:
        if corrupt["on"] and layer == 2:
            buf.view(torch.int32).view(-1)[77] ^= 1  # one bit of one V or K value

    backend = make_backend("gloo", checksums=True, on_layer_staged=flip_one_value)
    if rank == 0:
        with pytest.raises(TransferChecksumError) as err:
            backend.send("bad", src.layers, src_ids, 1, num_tokens=tokens, timeout=TIMEOUT)
        corrupt["on"] = False
        backend.send("good", src.layers, src_ids, 1, num_tokens=tokens, timeout=TIMEOUT)
    else:
        before = dst.data.clone()
        with pytest.raises(TransferChecksumError) as err:
            backend.recv("bad", dst.layers, dst_ids, 0, num_tokens=tokens, timeout=TIMEOUT)
        assert err.value.written_layers == 2
        assert_blocks_equal(src, src_ids, dst, dst_ids, layers=range(2))  # written
        assert_untouched(before, dst, except_ids=dst_ids, layers=range(2))  # 2, 3 untouched
        backend.recv("good", dst.layers, dst_ids, 0, num_tokens=tokens, timeout=TIMEOUT)
        assert_blocks_equal(src, src_ids, dst, dst_ids)
    backend.close()
    return err.value.layer


def silent_sender(rank: int, group: TransferGroup, wait_s: float) -> dict[str, object]:
    spec = tiny_spec()
    src, dst = random_cache(spec, 16, seed=1), random_cache(spec, 16, seed=2)
    src_ids, dst_ids = [0, 9], [5, 6]
    backend = make_backend("gloo")
    out: dict[str, object] = {}
    if rank == 1:
        before = dst.data.clone()
        start = time.monotonic()
        with pytest.raises(TransferTimeout):
            backend.recv("silent", dst.layers, dst_ids, 0, num_tokens=20, timeout=wait_s)
        out["elapsed"] = time.monotonic() - start
        assert_untouched(before, dst)
        # The channel is broken now, and the backend says so at once.
        start = time.monotonic()
        with pytest.raises(TransferChannelError):
            backend.recv("again", dst.layers, dst_ids, 0, num_tokens=20, timeout=TIMEOUT)
        out["broken_after"] = time.monotonic() - start
        group.store.set("test/receiver_timed_out", "1")
    else:
        group.store.wait(["test/receiver_timed_out"])
        # The sender wakes up late: gloo closed the connection when the receiver timed out.
        with pytest.raises(KVTransferError) as err:
            backend.send("silent", src.layers, src_ids, 1, num_tokens=20, timeout=2.0)
        out["late_sender_error"] = type(err.value).__name__
    # Recovery: both rebuild the group, make a new backend, and transfer again.
    group.rebuild()
    backend = make_backend("gloo")
    if rank == 0:
        backend.send("after", src.layers, src_ids, 1, num_tokens=20, timeout=TIMEOUT)
    else:
        backend.recv("after", dst.layers, dst_ids, 0, num_tokens=20, timeout=TIMEOUT)
        assert_blocks_equal(src, src_ids, dst, dst_ids)
    backend.close()
    out["epoch"] = group.epoch
    return out


# -- tests --------------------------------------------------------------------------------


def test_requests_back_to_back_arrive_bit_exactly():
    sent, received = run_pair(back_to_back, deadline_s=60.0)
    assert sent == received
    assert sent[0] == 4 * 2 * 4 * (16 * 2 * 32 * 4)  # layers * (K, V) * blocks * block bytes
    # Small transfers ride in the opening message, the large one in layer messages.
    assert [b > OPENING_MESSAGE_BYTES for b in sent] == [False] * 4 + [True, False]


def test_mismatched_header_raises_on_both_sides_and_leaves_the_channel_usable():
    sender, receiver = run_pair(mismatches)
    assert sender == receiver == ["num_tokens", "request_id", "dtype", "num_layers"]


@pytest.mark.parametrize("blocks", [3, 270], ids=["in-the-opening-message", "layer-messages"])
def test_debug_checksums_catch_a_corrupted_layer(blocks):
    assert run_pair(corrupted_layer, blocks=blocks, deadline_s=60.0) == [2, 2]


def test_silent_sender_times_out_within_the_deadline_and_the_group_can_be_rebuilt():
    wait_s = 0.5
    sender, receiver = run_pair(silent_sender, wait_s=wait_s)
    assert wait_s <= receiver["elapsed"] < wait_s + 1.0
    assert receiver["broken_after"] < 0.1
    assert sender["late_sender_error"] in {"TransferChannelError", "TransferTimeout"}
    assert sender["epoch"] == receiver["epoch"] == 1

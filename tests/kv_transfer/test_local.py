"""The in-process backend: bit-exact transfers, and nothing written on a bad header."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kv_transfer import (
    InvalidTransferArgument,
    LocalBackend,
    LocalHub,
    TransferChecksumError,
    TransferMismatch,
    TransferTimeout,
)
from kv_transfer.blocks import pool_view
from kv_transfer.layout import KVLayout
from tests.kv_transfer._caches import (
    assert_blocks_equal,
    assert_untouched,
    bits,
    random_cache,
    tiny_spec,
)

SRC_IDS = [7, 2, 9, 4]  # not contiguous, not sorted
DST_IDS = [1, 8, 3, 5]  # different ids on the other side
TOKENS = 55  # 4 blocks of 16, the last one partly filled


def pair(checksums: bool = False, hook=None) -> tuple[LocalBackend, LocalBackend, LocalHub]:
    hub = LocalHub()
    sender = LocalBackend(hub, 0, checksums=checksums, on_layer_staged=hook)
    return sender, LocalBackend(hub, 1, checksums=checksums), hub


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("checksums", [False, True], ids=["plain", "checksums"])
def test_every_layer_arrives_bit_exactly(dtype, checksums):
    spec = tiny_spec(dtype)
    src, dst = random_cache(spec, 12, seed=1), random_cache(spec, 10, seed=2)
    src.data[1, 0, 9, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=dtype)
    before = dst.data.clone()
    sender, receiver, _ = pair(checksums)
    sent = sender.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    got = receiver.recv("r1", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=1.0)
    assert_blocks_equal(src, SRC_IDS, dst, DST_IDS)
    assert_untouched(before, dst, except_ids=DST_IDS)
    assert sent.bytes == got.bytes == 4 * spec.bytes_per_block  # 4 blocks, all layers, K and V
    assert len(got.layer_done_s) == spec.num_layers
    assert list(got.layer_done_s) == sorted(got.layer_done_s)


def test_separate_layer_tensors_take_the_per_layer_path():
    """Caches that are not views of one pool (here: one tensor per layer and K/V on the
    receiver) are copied layer by layer; the bits are the same."""
    spec = tiny_spec(torch.bfloat16)
    src = random_cache(spec, 12, seed=1)
    layers = [
        (torch.zeros(10, 16, 2, 32, dtype=spec.dtype), torch.ones(10, 16, 2, 32, dtype=spec.dtype))
        for _ in range(4)
    ]
    layout = KVLayout.of(layers)
    assert pool_view(layers, layout) is None
    assert pool_view(src.layers, KVLayout.of(src.layers)) is not None
    sender, receiver, _ = pair(checksums=True)
    sender.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    receiver.recv("r1", layers, DST_IDS, 0, num_tokens=TOKENS, timeout=1.0)
    for i, (k, v) in enumerate(layers):
        assert torch.equal(bits(k[DST_IDS]), bits(src.data[i, 0, SRC_IDS]))
        assert torch.equal(bits(v[DST_IDS]), bits(src.data[i, 1, SRC_IDS]))
        untouched = [b for b in range(10) if b not in DST_IDS]
        assert not k[untouched].any() and bool((v[untouched] == 1).all())


def test_source_blocks_may_change_once_send_returned():
    spec = tiny_spec()
    src, dst = random_cache(spec, 12, seed=1), random_cache(spec, 10, seed=2)
    expected = src.data.clone()
    sender, receiver, _ = pair()
    sender.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    src.data.zero_()  # the prefill frees and reuses its blocks
    receiver.recv("r1", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=1.0)
    src.data.copy_(expected)
    assert_blocks_equal(src, SRC_IDS, dst, DST_IDS)


# (what the receiver expects differently, the field reported)
MISMATCHES = [
    ({"request_id": "other"}, "request_id"),
    ({"num_tokens": 60}, "num_tokens"),  # same 4 blocks, different token count
    ({"num_tokens": 70, "block_ids": [*DST_IDS, 6]}, "num_blocks"),
    ({"dtype": torch.bfloat16}, "dtype"),
    ({"num_kv_heads": 4}, "num_kv_heads"),
    ({"head_dim": 64}, "head_dim"),
    ({"block_size": 8, "block_ids": [*DST_IDS, 0, 6, 7]}, "num_blocks"),
    ({"num_layers": 3}, "num_layers"),
    ({"checksums": True}, "flags"),
]


@pytest.mark.parametrize(("change", "field"), MISMATCHES, ids=[m[1] for m in MISMATCHES])
def test_mismatched_expectation_raises_before_any_block_changes(change, field):
    src = random_cache(tiny_spec(), 12, seed=1)
    dst_spec = tiny_spec(
        change.get("dtype", torch.float32),
        **{
            k: change[k]
            for k in ("num_kv_heads", "head_dim", "block_size", "num_layers")
            if k in change
        },
    )
    dst = random_cache(dst_spec, 10, seed=2)
    before = dst.data.clone()
    hub = LocalHub()
    sender = LocalBackend(hub, 0)
    receiver = LocalBackend(hub, 1, checksums=change.get("checksums", False))
    sender.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    with pytest.raises(TransferMismatch) as err:
        receiver.recv(
            change.get("request_id", "r1"),
            dst.layers,
            change.get("block_ids", DST_IDS),
            0,
            num_tokens=change.get("num_tokens", TOKENS),
            timeout=1.0,
        )
    assert err.value.field == field
    assert not err.value.rejected_by_peer
    assert_untouched(before, dst)


def test_corrupted_layer_is_caught_and_nothing_is_written():
    def corrupt(layer: int, buf: torch.Tensor) -> None:
        if layer == 3:
            buf[1, 2, 5, 1, 7] += 1.0  # one V value of the third block

    spec = tiny_spec()
    src, dst = random_cache(spec, 12, seed=1), random_cache(spec, 10, seed=2)
    before = dst.data.clone()
    sender, receiver, _ = pair(checksums=True, hook=corrupt)
    sender.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    with pytest.raises(TransferChecksumError) as err:
        receiver.recv("r1", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=1.0)
    assert err.value.layer == 3
    assert_untouched(before, dst)  # local checks every layer before the first scatter


def test_swapped_blocks_fail_the_checksum():
    def swap(layer: int, buf: torch.Tensor) -> None:
        if layer == 0:
            buf[0, [0, 1]] = buf[0, [1, 0]].clone()  # same bytes, wrong order

    spec = tiny_spec()
    src, dst = random_cache(spec, 12, seed=1), random_cache(spec, 10, seed=2)
    sender, receiver, _ = pair(checksums=True, hook=swap)
    sender.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    with pytest.raises(TransferChecksumError):
        receiver.recv("r1", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=1.0)


def test_timeout_then_a_late_parcel_is_rejected_and_the_next_one_accepted():
    spec = tiny_spec()
    src, dst = random_cache(spec, 12, seed=1), random_cache(spec, 10, seed=2)
    sender, receiver, hub = pair()
    start = time.monotonic()
    with pytest.raises(TransferTimeout):
        receiver.recv("a", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 0.7
    sender.send("a", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)  # too late
    sender.send("b", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    with pytest.raises(TransferMismatch):  # the receiver moved on to "b"
        receiver.recv("b", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=1.0)
    receiver.recv("b", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=1.0)
    assert_blocks_equal(src, SRC_IDS, dst, DST_IDS)
    assert hub.pending(0, 1) == 0


def test_receiver_waiting_in_another_thread_wakes_up_on_send():
    spec = tiny_spec()
    src, dst = random_cache(spec, 12, seed=1), random_cache(spec, 10, seed=2)
    sender, receiver, _ = pair()
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            receiver.recv("r1", dst.layers, DST_IDS, 0, num_tokens=TOKENS, timeout=5.0)
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    thread = threading.Thread(target=receive)
    thread.start()
    time.sleep(0.05)
    sender.send("r1", src.layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    thread.join(timeout=5.0)
    assert not thread.is_alive() and not errors
    assert_blocks_equal(src, SRC_IDS, dst, DST_IDS)


BAD_INPUT = [
    ({"block_ids": [7, 2, 9, 12]}, "block_ids"),  # 12 is past a 12-block pool
    ({"block_ids": [7, 2, 9, 7]}, "block_ids"),  # a block twice
    ({"block_ids": [7, 2, 9]}, "block_ids"),  # 55 tokens need 4 blocks
    ({"block_ids": [7, 2, 9, -1]}, "block_ids"),
    ({"block_ids": [7.0, 2, 9, 4]}, "block_ids"),
    ({"num_tokens": 0}, "num_tokens"),
    ({"timeout": 0.0}, "timeout"),
    ({"peer": 0}, "peer"),  # itself
]


@pytest.mark.parametrize(("change", "field"), BAD_INPUT, ids=[str(c) for c, _ in BAD_INPUT])
def test_bad_input_is_a_typed_error(change, field):
    src = random_cache(tiny_spec(), 12, seed=1)
    sender, _, hub = pair()
    args = {"block_ids": SRC_IDS, "num_tokens": TOKENS, "timeout": 1.0, "peer": 1} | change
    with pytest.raises(InvalidTransferArgument) as err:
        sender.send(
            "r1",
            src.layers,
            args["block_ids"],
            args["peer"],
            num_tokens=args["num_tokens"],
            timeout=args["timeout"],
        )
    assert err.value.field == field
    assert hub.pending(0, 1) == 0


def test_layers_of_different_shapes_are_rejected():
    src = random_cache(tiny_spec(), 12, seed=1)
    other = random_cache(tiny_spec(head_dim=16), 12, seed=1)
    sender, _, _ = pair()
    layers = [*src.layers[:2], other.layers[2]]
    with pytest.raises(InvalidTransferArgument, match="layer 2"):
        sender.send("r1", layers, SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)
    with pytest.raises(InvalidTransferArgument, match="block_size, H_kv, D"):
        sender.send("r1", [(src.data[0], src.data[1])], SRC_IDS, 1, num_tokens=TOKENS, timeout=1.0)

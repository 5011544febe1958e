"""The pieces under the backends: header words, verdicts, checksums, the pool handle's
encoding, backend selection and the group's address parsing."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kv_transfer import (
    InvalidTransferArgument,
    KVPoolHandle,
    KVTransferError,
    LocalBackend,
    LocalHub,
    P2PBackend,
    TransferStats,
    init_transfer_group,
    make_backend,
    resolve_kind,
)
from kv_transfer.group import parse_store_addr
from kv_transfer.header import (
    CONTROL_WORDS,
    HEADER_FIELDS,
    MAGIC,
    Flag,
    HeaderFields,
    Kind,
    SenderHeader,
    Status,
    Verdict,
    dtype_code,
    first_mismatch,
    request_digest,
)
from kv_transfer.layout import KVLayout, layer_checksum
from tests.kv_transfer._caches import random_cache, tiny_spec


def header(**change) -> HeaderFields:
    layout = KVLayout.of(random_cache(tiny_spec(), 8, seed=0).layers)
    fields = {"seq": 3, "request_id": "r", "flags": Flag(0), "num_tokens": 40, "num_blocks": 3}
    fields.update(change)
    return HeaderFields.build(
        fields["seq"],
        fields["request_id"],
        fields["flags"],
        layout,
        fields["num_tokens"],
        fields["num_blocks"],
        fields.get("per_message", 0),
    )


def test_header_is_fixed_size_and_names_every_word():
    words = header().words()
    assert len(words) == len(HEADER_FIELDS) == CONTROL_WORDS
    assert words[:4] == [MAGIC, 2, Kind.HEADER, 3]  # version 2: the opening message
    named = dict(zip(HEADER_FIELDS, words, strict=True))
    assert named["layer_bytes"] == 2 * 3 * 16 * 2 * 32 * 4
    assert named["dtype"] == dtype_code(torch.float32)
    assert named["extension_words"] == 0
    assert header(flags=Flag.CHECKSUMS).words()[14] == 2 * 4
    assert header(flags=Flag.CHECKSUMS | Flag.SOURCE_IDS).words()[14] == 2 * 4 + 3


def test_first_mismatch_reports_the_first_differing_field():
    a, b = header().words(), header(request_id="s", num_tokens=41).words()
    assert HEADER_FIELDS[first_mismatch(a, b)] == "request_id"
    assert first_mismatch(a, header().words()) is None
    garbage = [0] * CONTROL_WORDS
    assert HEADER_FIELDS[first_mismatch(a, garbage)] == "magic"


def test_request_digest_is_stable_and_fits_int64():
    assert request_digest(7) == request_digest("7")
    assert request_digest("a") != request_digest("b")
    assert 0 <= request_digest("x" * 1000) < 2**63


def test_verdict_parse_rejects_a_message_that_is_not_the_expected_verdict():
    ok = Verdict.ok().words(5)
    assert Verdict.parse(ok, 5) == Verdict.ok()
    bad_status = Verdict(Status.OK, 0, 0, 0).words(5)
    bad_status[4] = 9
    for words, seq in [(ok, 6), (header().words(), 3), (bad_status, 5)]:
        with pytest.raises(KVTransferError, match="out of step"):
            Verdict.parse(words, seq)


def test_a_rejected_header_still_says_what_to_drain():
    words = header(flags=Flag.CHECKSUMS, per_message=2).words()
    sender = SenderHeader.parse(words)
    assert sender is not None
    assert (sender.num_layers, sender.num_blocks, sender.extension_words) == (4, 3, 8)
    assert sender.message_numel(2) == 2 * 2 * 3 * 16 * 2 * 32
    assert SenderHeader.parse([0] * CONTROL_WORDS) is None  # not a header
    absurd = list(words)
    absurd[7] = 2**40  # blocks
    assert SenderHeader.parse(absurd) is None
    unknown_dtype = list(words)
    unknown_dtype[12] = 99
    assert SenderHeader.parse(unknown_dtype) is None


def test_unknown_dtype_is_a_typed_error():
    with pytest.raises(InvalidTransferArgument, match="known: float32"):
        dtype_code(torch.complex64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_checksum_sees_one_flipped_bit_and_swapped_blocks(dtype):
    buf = (torch.rand(2, 5, 3, 1, 3) * 100).to(dtype)  # odd block bytes for uint8
    base = layer_checksum(buf)
    assert layer_checksum(buf.clone()) == base
    flipped = buf.clone()
    flipped.view(torch.uint8).view(-1)[17] ^= 4
    assert layer_checksum(flipped) != base
    swapped = buf.clone()
    swapped[1, [2, 3]] = buf[1, [3, 2]]
    if not torch.equal(buf[1, 2], buf[1, 3]):
        assert layer_checksum(swapped) != base


def test_pool_handle_round_trips_through_bytes():
    handle = KVPoolHandle(
        device_uuid="GPU-1234",
        shape=(4, 2, 10, 16, 2, 32),
        stride=(20480, 10240, 1024, 64, 32, 1),
        storage_offset=0,
        dtype_code=dtype_code(torch.bfloat16),
        ipc_handle=bytes(range(64)),
        storage_size_bytes=163840,
        storage_offset_bytes=512,
        ref_counter_handle=b"/torch_123_456",
        ref_counter_offset=8,
        event_handle=None,
        event_sync_required=False,
    )
    assert KVPoolHandle.from_bytes(handle.to_bytes()) == handle
    for bad in [b"not json", b'{"version": 99}', handle.to_bytes().replace(b'"shape"', b'"shap"')]:
        with pytest.raises(InvalidTransferArgument):
            KVPoolHandle.from_bytes(bad)


def test_stats_derive_per_layer_seconds_and_bandwidth():
    stats = TransferStats("r", "gloo", "recv", 0, 0, 2, 3, 2_000_000, 0.01, 0.002, (0.005, 0.009))
    assert stats.layer_seconds == pytest.approx((0.003, 0.004))
    assert stats.gbps == pytest.approx(0.2)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(InvalidTransferArgument, match="known: auto, gloo, nccl, cuda_ipc, local"):
        make_backend("tcp")


def test_auto_picks_by_device_and_process():
    assert resolve_kind("auto", "cpu", same_process=True) == "local"
    assert resolve_kind("auto", "cpu") == "gloo"
    assert resolve_kind("nccl", "cpu") == "nccl"  # explicit kinds are taken as given
    assert isinstance(make_backend("auto", same_process=True, hub=LocalHub(), rank=0), LocalBackend)


def test_backend_needs_what_it_moves_over():
    with pytest.raises(InvalidTransferArgument, match="LocalHub"):
        make_backend("local")
    with pytest.raises(InvalidTransferArgument, match="init_transfer_group"):
        make_backend("gloo")  # no process group in this process
    with pytest.raises(InvalidTransferArgument, match="CUDA"):
        make_backend("cuda_ipc", device="cpu")


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("10.0.0.1:29500", ("10.0.0.1", 29500)),
        ("[::1]:80", ("::1", 80)),
        ("node-3:1", ("node-3", 1)),
    ],
)
def test_store_address_parses(addr, expected):
    assert parse_store_addr(addr) == expected


@pytest.mark.parametrize("addr", ["10.0.0.1", ":29500", "host:0", "host:70000", "host:port"])
def test_bad_store_address_is_a_typed_error(addr):
    with pytest.raises(InvalidTransferArgument, match="host:port"):
        parse_store_addr(addr)


def test_group_of_one_rejects_bad_peers_and_options():
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=5))
    with pytest.raises(InvalidTransferArgument, match="known: gloo, nccl"):
        init_transfer_group(0, 1, f"127.0.0.1:{store.port}", "mpi")
    group = init_transfer_group(0, 1, f"127.0.0.1:{store.port}", "gloo", host_store=False)
    try:
        with pytest.raises(InvalidTransferArgument, match="already has a default process group"):
            init_transfer_group(0, 1, f"127.0.0.1:{store.port}", "gloo", host_store=False)
        with pytest.raises(InvalidTransferArgument, match="need a nccl group"):
            P2PBackend(None, "cuda:0")
        backend = make_backend("gloo")
        cache = random_cache(tiny_spec(), 8, seed=0)
        for peer in (0, 1, -1):
            with pytest.raises(InvalidTransferArgument, match="not another rank"):
                backend.send("r", cache.layers, [1], peer, num_tokens=5, timeout=1.0)
        group.rebuild()
        assert group.epoch == 1 and dist.is_initialized()
    finally:
        group.destroy()
    assert not dist.is_initialized()

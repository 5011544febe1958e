"""Pair groups (kv_transfer.pairs): formed on demand between endpoints, no default group,
and a replaced endpoint pairs afresh with a survivor. Two threads of this process play
the two endpoints over a real TCPStore and real gloo groups."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch.distributed as dist

from kv_transfer import make_backend
from kv_transfer.errors import InvalidTransferArgument, KVTransferError, TransferTimeout
from kv_transfer.pairs import (
    NCCL_ERROR_HANDLING_ENV,
    PairGroup,
    PairGroups,
    configure_nccl_error_handling,
    connect_store,
    group_timeout,
    new_endpoint,
)
from tests.kv_transfer._caches import assert_blocks_equal, random_cache, tiny_spec


@pytest.fixture()
def store():
    host = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    yield host
    del host


def transfer(sender: PairGroups, receiver: PairGroups, seed: int, epoch: int = 0) -> None:
    """Form the pair from both sides at once, then move three blocks and check them."""
    spec = tiny_spec()
    src, dst = random_cache(spec, 8, seed=seed), random_cache(spec, 8, seed=seed + 1)

    def send():
        group, peer = sender.form(receiver.endpoint, epoch)
        backend = make_backend("gloo", group=group)
        stats = backend.send("r1", src.layers, [1, 4, 6], peer, num_tokens=40, timeout=10)
        backend.close()
        return stats

    def recv():
        group, peer = receiver.form(sender.endpoint, epoch)
        backend = make_backend("gloo", group=group)
        stats = backend.recv("r1", dst.layers, [0, 2, 7], peer, num_tokens=40, timeout=10)
        backend.close()  # delivers the verdict the receiver did not wait for
        return stats

    with ThreadPoolExecutor(2) as pool:
        sent, received = pool.submit(send), pool.submit(recv)
        assert sent.result(timeout=30).bytes == received.result(timeout=30).bytes > 0
    assert_blocks_equal(src, [1, 4, 6], dst, [0, 2, 7])


@pytest.mark.usefixtures("message_order")
def test_a_pair_forms_on_demand_and_moves_kv_without_a_default_group(store):
    assert not dist.is_initialized()
    address = f"127.0.0.1:{store.port}"
    prefill = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=10)
    decode = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)
    transfer(prefill, decode, seed=1)
    transfer(prefill, decode, seed=3)  # the formed pair is reused
    assert prefill.form(decode.endpoint) == prefill.form(decode.endpoint)
    assert not dist.is_initialized()


@pytest.mark.usefixtures("message_order")
def test_a_replaced_endpoint_pairs_afresh_with_the_survivor(store):
    address = f"127.0.0.1:{store.port}"
    prefill = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=10)
    first = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)
    transfer(prefill, first, seed=5)
    second = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)  # restarted
    assert second.endpoint != first.endpoint
    transfer(prefill, second, seed=7)


def test_a_peer_that_never_forms_the_pair_times_out(store):
    address = f"127.0.0.1:{store.port}"
    alone = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=1.0)
    with pytest.raises(TransferTimeout, match="forming a pair"):
        alone.form(new_endpoint("decode-9"))


def test_bad_endpoints_and_backends_are_named():
    with pytest.raises(InvalidTransferArgument, match="node_id"):
        new_endpoint("a@b")
    with pytest.raises(InvalidTransferArgument, match="backend"):
        PairGroups("127.0.0.1:1", "x@1", "mpi", timeout=1)
    with pytest.raises(InvalidTransferArgument, match="store_addr"):
        PairGroups("no-port", "x@1", "gloo", timeout=1)
    with pytest.raises(InvalidTransferArgument, match="itself"):
        PairGroups("127.0.0.1:1", "x@1", "gloo", timeout=1).form("x@1")
    with pytest.raises(KVTransferError, match="cannot reach"):
        connect_store("127.0.0.1:1", timeout=0.5)


@pytest.mark.usefixtures("message_order")
def test_a_broken_channel_is_formed_again_at_the_next_epoch(store):
    """Both sides move to epoch 1 (as the coordinator tells them after a break): a fresh
    channel forms under new store keys and carries KV; epoch 0's group is dropped."""
    address = f"127.0.0.1:{store.port}"
    prefill = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=10)
    decode = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)
    transfer(prefill, decode, seed=9)
    old, _ = prefill.form(decode.endpoint)
    transfer(prefill, decode, seed=11, epoch=1)
    new, _ = prefill.form(decode.endpoint, 1)
    assert new is not old and (decode.endpoint, 0) not in prefill._groups
    with pytest.raises(InvalidTransferArgument, match="epoch"):
        prefill.form(decode.endpoint, -1)


def test_an_extension_too_long_for_the_opening_message_is_refused_before_sending(
    store, monkeypatch
):
    """The receiver's first receive is OPENING_MESSAGE_BYTES long and gloo aborts a process
    that gets a longer message, so a sender refuses one (here: checksums on a shrunken
    limit) before sending anything; the channel still carries the next transfer. (Plain
    gloo only: in NCCL's order there is no opening message.)"""
    monkeypatch.delenv("KV_TRANSFER_NCCL_ORDER", raising=False)
    address = f"127.0.0.1:{store.port}"
    prefill = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=10)
    decode = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)
    with ThreadPoolExecutor(2) as pool:
        formed = (
            pool.submit(prefill.form, decode.endpoint),
            pool.submit(decode.form, prefill.endpoint),
        )
        (group, peer), _ = formed[0].result(timeout=30), formed[1].result(timeout=30)
    cache = random_cache(tiny_spec(), 8, seed=1)
    backend = make_backend("gloo", group=group, checksums=True)
    control_bytes = 8 * (16 + 2 * 4)  # header + two checksum words per layer
    for module in ("kv_transfer.channel", "kv_transfer.p2p"):
        monkeypatch.setattr(f"{module}.OPENING_MESSAGE_BYTES", control_bytes - 8)
    with pytest.raises(InvalidTransferArgument, match="opening message") as err:
        backend.send("r1", cache.layers, [1, 4, 6], peer, num_tokens=40, timeout=5)
    assert err.value.field == "block_ids"
    monkeypatch.undo()
    transfer(prefill, decode, seed=13)  # nothing was sent: the next transfer goes through


def test_an_nccl_group_outlives_the_transfer_deadline_and_node_processes_keep_living(
    monkeypatch,
):
    """NCCL's watchdog must never fire before a transfer's own deadline (it would tear the
    process down), and in a node process a failed communicator is aborted, not the node."""
    assert group_timeout(30.0) >= 30.0 + 30.0 and group_timeout(200.0) == 400.0
    monkeypatch.delenv(NCCL_ERROR_HANDLING_ENV, raising=False)
    configure_nccl_error_handling()
    assert os.environ[NCCL_ERROR_HANDLING_ENV] == "2"
    monkeypatch.setenv(NCCL_ERROR_HANDLING_ENV, "1")  # an operator's choice is kept
    configure_nccl_error_handling()
    assert os.environ[NCCL_ERROR_HANDLING_ENV] == "1"


def test_superseded_and_broken_groups_are_aborted(store, monkeypatch):
    aborted: list[PairGroup] = []
    monkeypatch.setattr(PairGroup, "abort", lambda self: aborted.append(self))
    address = f"127.0.0.1:{store.port}"
    prefill = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=10)
    decode = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)
    transfer(prefill, decode, seed=9)
    old_prefill, _ = prefill.form(decode.endpoint)
    old_decode, _ = decode.form(prefill.endpoint)
    transfer(prefill, decode, seed=11, epoch=1)  # the coordinator moved the pair on
    assert {id(g) for g in aborted} == {id(old_prefill), id(old_decode)}
    # A transfer that times out marks its peer broken: its group is aborted at once.
    aborted.clear()
    group, peer = decode.form(prefill.endpoint, 1)
    backend = make_backend("gloo", group=group)
    cache = random_cache(tiny_spec(), 8, seed=1)
    with pytest.raises(TransferTimeout):
        backend.recv("never-sent", cache.layers, [0], peer, num_tokens=16, timeout=0.3)
    assert aborted == [group]

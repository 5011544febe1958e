"""A node's KV transfer threads (disagg.node.transfers) over real pair groups: two
``TransferThreads`` in this process, one per side, move blocks at epoch 0, move to
epoch 1 (a fresh channel) as the coordinator would after a break, and refuse at once a
transfer of a superseded epoch."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from disagg.node.transfers import TransferDone, TransferThreads, rank_endpoint
from kv_transfer import make_backend
from kv_transfer.pairs import PairGroups, new_endpoint
from tests.kv_transfer._caches import assert_blocks_equal, node_layout, random_cache, tiny_spec


@pytest.fixture()
def sides():
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    address = f"127.0.0.1:{store.port}"
    spec = tiny_spec()
    made = []
    for seed in (1, 2):
        cache = random_cache(spec, 8, seed=seed)
        endpoint = new_endpoint(f"node-{seed}")
        pairs = PairGroups(address, rank_endpoint(endpoint, 0), "gloo", timeout=10)
        threads = TransferThreads(
            pairs,
            lambda group: make_backend("gloo", group=group),
            cache,
            node_layout(spec),
            0,
            timeout=10,
        )
        made.append((threads, cache, endpoint))
    yield made
    for threads, _, _ in made:
        threads.close()
    del store


def wait_done(threads: TransferThreads, count: int = 1) -> list[TransferDone]:
    deadline, done = time.monotonic() + 30, []
    while len(done) < count and time.monotonic() < deadline:
        done += threads.completed()
        time.sleep(0.01)
    assert len(done) == count, "the transfer did not finish"
    return done


def test_blocks_move_at_one_epoch_then_a_fresh_channel_at_the_next(sides):
    (sender, src, frm), (receiver, dst, to) = sides
    for epoch, (src_ids, dst_ids) in enumerate([([1, 3], [0, 5]), ([2, 6], [4, 7])]):
        sender.send((10 + epoch,), src_ids, to, epoch)
        receiver.recv((10 + epoch,), dst_ids, frm, epoch)
        sent, received = wait_done(sender)[0], wait_done(receiver)[0]
        assert sent.error is None and received.error is None, (sent, received)
        assert (sent.epoch, received.epoch) == (epoch, epoch)
        assert_blocks_equal(src, src_ids, dst, dst_ids)
    # A transfer still asking for epoch 0 fails at once, without touching the channel.
    sender.send((12,), [1], to, 0)
    stale = wait_done(sender)[0]
    assert stale.error is not None and "superseded" in stale.error and stale.broken_channel

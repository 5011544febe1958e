"""Per-peer transfer streams (kv_transfer/streams.py), with a stand-in for torch.cuda
that records what a GPU would be asked to do, and the channel's use of them over a real
gloo pair."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer import make_backend
from kv_transfer.pairs import PairGroups, new_endpoint
from kv_transfer.streams import TransferStreams
from tests.kv_transfer._caches import assert_blocks_equal, random_cache, tiny_spec


class FakeCuda:
    """Streams are names; ``log`` holds (op, stream[, other]) in call order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.current = "compute"
        self._made = 0

    def Stream(self, device):  # torch.cuda spells it so
        self._made += 1
        stream = f"s{self._made}"
        cuda = self

        class _S:
            name = stream

            def wait_stream(self, other: str) -> None:
                cuda.log.append(("wait", stream, other))

        return _S()

    def current_stream(self, device) -> str:
        return self.current

    @contextmanager
    def stream(self, s):
        before, self.current = self.current, s.name
        self.log.append(("enter", s.name))
        try:
            yield
        finally:
            self.current = before


def test_each_peer_has_its_own_stream_and_sends_wait_for_compute():
    cuda = FakeCuda()
    streams = TransferStreams(torch.device("cuda", 0), cuda=cuda)
    with streams.use(1, after_compute=True):
        assert cuda.current == "s1"  # what the send queues runs on peer 1's stream
    with streams.use(2, after_compute=False):
        assert cuda.current == "s2"
    with streams.use(1, after_compute=False):
        assert cuda.current == "s1"  # the same stream for the same peer
    assert cuda.current == "compute"
    assert cuda.log == [
        ("wait", "s1", "compute"),  # a send reads KV compute wrote: after it, on the GPU
        ("enter", "s1"),
        ("enter", "s2"),  # a receive writes free blocks: no wait on compute
        ("enter", "s1"),
    ]


def test_off_cuda_streams_do_nothing():
    streams = TransferStreams(torch.device("cpu"))
    with streams.use(1, after_compute=True):
        pass
    assert streams._streams == {}


def test_the_channel_sends_after_compute_and_receives_without_waiting(monkeypatch):
    calls: list[tuple[int, bool]] = []
    original = TransferStreams.use

    def spy(self, peer, *, after_compute):
        calls.append((peer, after_compute))
        return original(self, peer, after_compute=after_compute)

    monkeypatch.setattr(TransferStreams, "use", spy)
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    address = f"127.0.0.1:{store.port}"
    a = PairGroups(address, new_endpoint("prefill-0"), "gloo", timeout=10)
    b = PairGroups(address, new_endpoint("decode-0"), "gloo", timeout=10)
    src, dst = random_cache(tiny_spec(), 8, seed=1), random_cache(tiny_spec(), 8, seed=2)

    def side(pairs, peer_pairs, send: bool):
        group, peer = pairs.form(peer_pairs.endpoint)
        backend = make_backend("gloo", group=group)
        if send:
            backend.send("r", src.layers, [1, 2], peer, num_tokens=20, timeout=10)
        else:
            backend.recv("r", dst.layers, [5, 0], peer, num_tokens=20, timeout=10)
        backend.close()
        return peer

    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(side, a, b, True), pool.submit(side, b, a, False)
        peers = [f.result(timeout=30) for f in fs]
    assert_blocks_equal(src, [1, 2], dst, [5, 0])
    assert sorted(calls) == sorted([(peers[0], True), (peers[1], False)])
    del store

"""The decode node's bookkeeping, driven message by message (a real tiny worker; the
coordinator link and the transfer threads are stand-ins that record what they get)."""

from __future__ import annotations

from dataclasses import dataclass, field

from decode_node.node import DecodeNode
from disagg.engine.worker import ModelWorker
from disagg.node.settings import NodeSettings
from disagg.node.transfers import TransferDone
from disagg.protocol.cluster import DecodeTask, Pulled, PullGo, PullRequest, SourceLost
from disagg.protocol.messages import Sampling

SOURCE = "prefill-0@0a"


@dataclass
class RecordingLink:
    sent: list = field(default_factory=list)

    def watch(self, fd: int) -> None:
        pass

    def send(self, msg) -> None:
        self.sent.append(msg)


@dataclass
class RecordingTransfers:
    receives: list = field(default_factory=list)
    on_done: object = None
    failure: str | None = None

    def recv(self, rids, block_ids, peer, epoch, peer_layout=(1, 1)) -> None:
        self.receives.append((rids, list(block_ids), peer, epoch))


def decode_node() -> DecodeNode:
    settings = NodeSettings(
        role="decode", node_id="decode-0", coordinator="tcp://127.0.0.1:1", store="127.0.0.1:1",
        num_blocks=64, threads=1,
    )  # fmt: skip
    worker = ModelWorker(settings.engine_config())
    return DecodeNode(settings, worker, RecordingLink(), RecordingTransfers())


def task(rid: int, source: str | None = SOURCE) -> DecodeTask:
    return DecodeTask(
        task=rid, rid=rid, client_id="alice", prompt_token_ids=list(range(3, 43)),
        output_token_ids=[7], sampling=Sampling(max_tokens=8, temperature=0), counter=0.0,
        arrival=0.0, source=source,
    )  # fmt: skip


def test_a_receive_from_a_lost_source_is_not_waited_for():
    """The source dies while the KV receive waits on it (forming a pair with a dead peer
    blocks until the transfer timeout): the request is admitted again into fresh blocks
    and recomputes at once; the blocks the receive may still write are freed only when
    it ends, and its late end does not touch the request."""
    node = decode_node()
    allocator = node.worker.allocator
    free_before = allocator.num_free
    node.handle(task(1))
    node.between_steps()  # admitted: blocks for the prompt, a pull asked for
    assert isinstance(node.link.sent[-1], PullRequest) and node.link.sent[-1].rids == [1]
    node.handle(PullGo(rids=[1], source=SOURCE, epoch=0))
    ((rids, receiving_into, peer, _),) = node.transfers.receives
    assert rids == (1,) and peer == SOURCE and receiving_into

    node.handle(SourceLost(rid=1))
    node.between_steps()
    assert 1 in node.recompute and 1 not in node.pulling
    fresh = node.recompute[1].seq.block_table
    assert fresh and not set(fresh) & set(receiving_into)  # never the receive's blocks
    held = len(fresh) + len(receiving_into)
    assert allocator.num_free == free_before - held

    node.on_transfer(TransferDone((1,), "recv", SOURCE, 0, None, "timed out", True))
    assert isinstance(node.link.sent[-1], Pulled)  # still reported to the coordinator
    assert allocator.num_free == free_before - len(fresh)  # the receive's blocks are back
    assert node.recompute[1].seq.block_table == fresh  # the request is untouched


def test_a_lost_source_before_the_receive_recomputes_in_the_same_blocks():
    node = decode_node()
    node.handle(task(2))
    node.between_steps()
    blocks = list(node.pulling[2].seq.block_table)
    node.handle(SourceLost(rid=2))
    assert node.recompute[2].seq.block_table == blocks and not node.transfers.receives

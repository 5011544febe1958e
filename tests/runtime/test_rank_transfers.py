"""A rank-group node's leader side of KV transfers (``RankTransfers``), driven over real
pipes with the ranks played by this test: which ranks get each command (the ranks with
pieces in the hand-off plan), how their answers merge into one report, and that a rank
whose pipe closes is the node failing."""

from __future__ import annotations

import multiprocessing as mp
import time

from disagg.node.rank_transfers import KVMoved, MoveKV, RankTransfers
from disagg.node.transfers import TransferDone
from tests.kv_transfer._caches import node_layout, tiny_spec


def group(tp: int, pp: int):
    pipes = [mp.Pipe(duplex=True) for _ in range(tp * pp)]
    leader = RankTransfers([a for a, _ in pipes], node_layout(tiny_spec(), tp=tp, pp=pp))
    return leader, [b for _, b in pipes]


def wait_done(transfers: RankTransfers, count: int = 1) -> list[TransferDone]:
    deadline, done = time.monotonic() + 10, []
    while len(done) < count and time.monotonic() < deadline:
        done += transfers.completed()
        time.sleep(0.01)
    assert len(done) == count, "the transfer was not reported"
    return done


def part(msg: MoveKV, rank: int, error: str | None = None, broken: bool = False) -> KVMoved:
    return KVMoved(
        msg.seq, rank, TransferDone(msg.rids, msg.role, msg.peer, msg.epoch, None, error, broken)
    )


def test_every_rank_with_pieces_gets_the_command_and_the_report_waits_for_all():
    leader, ranks = group(tp=2, pp=1)
    try:
        leader.recv((7, 8), [3, 4, 5], "prefill-0@ab", 2, (1, 2))  # from a pp 2 node
        msgs = [r.recv() for r in ranks]
        assert all(isinstance(m, MoveKV) for m in msgs)
        assert {(m.rids, m.block_ids, m.peer, m.epoch, m.peer_layout) for m in msgs} == {
            ((7, 8), (3, 4, 5), "prefill-0@ab", 2, (1, 2))
        }
        ranks[0].send(part(msgs[0], 0))
        time.sleep(0.2)
        assert leader.completed() == []  # rank 1 has not answered
        ranks[1].send(part(msgs[1], 1))
        (done,) = wait_done(leader)
        assert done.error is None and done.rids == (7, 8) and done.peer == "prefill-0@ab"
        assert leader.in_flight == 0
    finally:
        leader.close()


def test_one_ranks_failure_fails_the_transfer_and_a_broken_pair_is_reported():
    leader, ranks = group(tp=2, pp=1)
    try:
        leader.send((9,), [1], "decode-0@cd", 0, (2, 1))
        msgs = [r.recv() for r in ranks]
        ranks[0].send(part(msgs[0], 0))
        ranks[1].send(part(msgs[1], 1, error="timed out", broken=True))
        (done,) = wait_done(leader)
        assert done.error == "timed out" and done.broken_channel and done.stats is None
    finally:
        leader.close()


def test_only_ranks_holding_pieces_are_asked():
    # An MQA model's one KV head, replicated on both ranks of a tp 2 prefill node: a
    # decode node of one rank needs it once, from one of them (the plan picks rank 0).
    pipes = [mp.Pipe(duplex=True) for _ in range(2)]
    layout = node_layout(tiny_spec(num_kv_heads=1), tp=2)
    leader = RankTransfers([a for a, _ in pipes], layout)
    ranks = [b for _, b in pipes]
    try:
        leader.send((1,), [0], "decode-0@cd", 0, (1, 1))
        msg = ranks[0].recv()
        assert isinstance(msg, MoveKV) and not ranks[1].poll(0.3)
        ranks[0].send(part(msg, 0))
        (done,) = wait_done(leader)  # rank 1's silence does not hold the report
        assert done.error is None
    finally:
        leader.close()


def test_a_rank_whose_pipe_closes_fails_the_node():
    leader, ranks = group(tp=1, pp=2)
    woken = []
    leader.on_done = lambda: woken.append(1)
    try:
        ranks[1].close()  # the rank process died
        deadline = time.monotonic() + 5
        while leader.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leader.failure is not None and "rank 1" in leader.failure
        assert woken  # the node's loop is woken to notice
    finally:
        leader.close()

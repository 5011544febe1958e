from __future__ import annotations

from dataclasses import dataclass

import pytest

from disagg.errors import ConfigError
from disagg.scheduling import FCFS, make_policy


@dataclass
class Req:
    seq_id: int
    arrival_time: float
    client_id: str = "a"


def test_serves_in_arrival_order_whatever_the_insertion_order():
    q = FCFS()
    reqs = [Req(i, t) for i, t in enumerate([3.0, 1.0, 2.0, 0.5])]
    for r in reqs:
        q.add(r)
    assert [q.pop().arrival_time for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert q.peek() is None and len(q) == 0
    with pytest.raises(IndexError):
        q.pop()


def test_removed_request_is_skipped_and_can_come_back_once():
    q = FCFS()
    a, b = Req(0, 0.0), Req(1, 1.0)
    q.add(a)
    q.add(b)
    assert q.remove(a) and not q.remove(a)
    assert len(q) == 1 and q.peek() is b
    q.add(a)  # e.g. a preempted request returning
    assert len(q) == 2
    assert [q.pop(), q.pop()] == [a, b]
    assert q.peek() is None


def test_preemption_victim_is_the_latest_arrival():
    running = [Req(0, 0.0), Req(5, 2.0), Req(3, 1.0)]
    assert FCFS().preemption_victim(running).seq_id == 5


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ConfigError, match="fcfs") as info:
        make_policy("lottery")
    assert info.value.field == "policy"

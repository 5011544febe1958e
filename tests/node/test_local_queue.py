"""A node's queue is its policy: merged-counter order as last published, and the
preemption victim the coordinator's counter-ordered policy would choose."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.node.local_queue import CounterQueue
from disagg.scheduling import FCFS, CounterOrdered, ServiceLedger
from tests.scheduling.helpers import Req


@dataclass
class Item:
    rid: int
    client_id: str
    counter: float
    arrival: float


def test_peek_and_pop_follow_counter_then_arrival_and_a_publication_reorders():
    q: CounterQueue[Item] = CounterQueue()
    for item in [Item(1, "a", 3.0, 0.0), Item(2, "b", 1.0, 1.0), Item(3, "b", 1.0, 2.0)]:
        q.push(item)
    assert q.pop().rid == 2
    q.publish({"b": 9.0})  # b was served since: a goes first now
    assert [q.pop().rid, q.pop().rid] == [1, 3]
    assert q.peek() is None and len(q) == 0


def test_a_removed_item_is_never_peeked_and_a_push_is_seen():
    q: CounterQueue[Item] = CounterQueue()
    q.push(Item(1, "a", 0.0, 0.0))
    q.push(Item(2, "a", 0.0, 1.0))
    assert q.peek().rid == 1
    q.remove(1)
    assert q.peek().rid == 2
    q.push(Item(0, "a", 0.0, -1.0))
    assert q.pop().rid == 0 and q.pop().rid == 2 and q.peek() is None


running = st.lists(
    st.tuples(st.sampled_from("abc"), st.integers(0, 5)), min_size=1, max_size=8
)  # fmt: skip
counters = st.dictionaries(st.sampled_from("abc"), st.integers(0, 4).map(float))


@settings(max_examples=200, deadline=None)
@given(running, counters)
def test_the_victim_is_the_one_counter_ordered_and_fcfs_choose(entries, published):
    q: CounterQueue[Item] = CounterQueue()
    q.publish(published)
    items = [Item(i, c, 0.0, float(t)) for i, (c, t) in enumerate(entries)]
    ledger = ServiceLedger()
    for client, value in published.items():
        ledger.charge(client, value)
    reqs = [Req(i, c, float(t)) for i, (c, t) in enumerate(entries)]
    assert q.preemption_victim(items).rid == CounterOrdered(ledger).preemption_victim(reqs).seq_id
    unpublished: CounterQueue[Item] = CounterQueue()  # FCFS: every counter 0
    assert unpublished.preemption_victim(items).rid == FCFS().preemption_victim(reqs).seq_id

"""The shared admission rule, by its properties: nothing overtakes a head that does not
fit, every limit holds, and when everything fits everything is taken."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.scheduling import FCFS, CounterOrdered, ServiceLedger
from disagg.scheduling.admission import Limits, make_room, take_in_order, watermark
from tests.scheduling.helpers import Req


@dataclass(frozen=True)
class Item:
    need: int
    tokens: int


class ListQueue:
    """A queue in a fixed order that records what the rule did with it."""

    def __init__(self, items: list[Item]):
        self.items = list(items)
        self.log: list[str] = []

    def peek(self) -> Item | None:
        self.log.append("peek")
        return self.items[0] if self.items else None

    def pop(self) -> Item:
        self.log.append("pop")
        return self.items.pop(0)


items = st.lists(
    st.builds(Item, st.integers(0, 40), st.integers(1, 60)), max_size=12
)  # fmt: skip
limits = st.builds(
    Limits,
    free=st.integers(0, 200),
    max_seqs=st.integers(1, 10),
    running=st.integers(0, 4),
    token_budget=st.one_of(st.none(), st.integers(1, 200)),
    watermark=st.integers(0, 20),
)


def reserve(lim: Limits, count: int) -> int:
    """The watermark the last of ``count`` taken requests was admitted under."""
    return lim.watermark if lim.running or count > 1 else 0


@settings(max_examples=400, deadline=None)
@given(items, limits)
def test_no_request_overtakes_a_head_that_does_not_fit_and_every_limit_holds(queue, lim):
    taken = take_in_order(ListQueue(queue), lim, lambda i: i.need, lambda i: i.tokens)
    k = len(taken)
    assert taken == queue[:k]  # a prefix of the order: nothing behind a head was taken
    need = sum(i.need for i in taken)
    tokens = sum(i.tokens for i in taken)
    assert lim.running + k <= lim.max_seqs or k == 0
    if k:
        assert need + reserve(lim, k) <= lim.free
    if lim.token_budget is not None and k > 1:
        assert tokens <= lim.token_budget
    if k < len(queue):  # it stopped at a head that would break a limit
        head = queue[k]
        over_cap = lim.running + k + 1 > lim.max_seqs
        over_budget = (
            k > 0 and lim.token_budget is not None and tokens + head.tokens > lim.token_budget
        )
        over_memory = need + head.need + reserve(lim, k + 1) > lim.free
        assert over_cap or over_budget or over_memory


@settings(max_examples=200, deadline=None)
@given(items, limits)
def test_when_everything_fits_everything_is_taken(queue, lim):
    need = sum(i.need for i in queue) + (lim.watermark if lim.running or len(queue) > 1 else 0)
    room = Limits(
        free=max(lim.free, need),
        max_seqs=max(lim.max_seqs, lim.running + len(queue)),
        running=lim.running,
        token_budget=None if lim.token_budget is None else sum(i.tokens for i in queue),
        watermark=lim.watermark,
    )
    assert take_in_order(ListQueue(queue), room, lambda i: i.need, lambda i: i.tokens) == queue


def test_the_first_request_may_exceed_the_token_budget_and_runs_alone():
    queue = [Item(1, 500), Item(1, 1)]
    assert take_in_order(ListQueue(queue), Limits(free=10, max_seqs=8, token_budget=100),
                         lambda i: i.need, lambda i: i.tokens) == [queue[0]]  # fmt: skip


def test_a_lone_request_may_use_the_watermark_but_one_beside_others_may_not():
    lim = Limits(free=10, max_seqs=8, watermark=3)
    assert take_in_order(ListQueue([Item(10, 1)]), lim, lambda i: i.need) == [Item(10, 1)]
    beside = Limits(free=10, max_seqs=8, running=1, watermark=3)
    assert take_in_order(ListQueue([Item(8, 1)]), beside, lambda i: i.need) == []
    assert take_in_order(ListQueue([Item(7, 1)]), beside, lambda i: i.need) == [Item(7, 1)]


def test_on_take_runs_before_the_next_head_is_looked_at():
    queue = ListQueue([Item(1, 1), Item(1, 1)])
    take_in_order(queue, Limits(free=10, max_seqs=8), lambda i: i.need,
                  on_take=lambda i: queue.log.append("take"))  # fmt: skip
    assert queue.log == ["peek", "pop", "take", "peek", "pop", "take", "peek"]


def test_a_vtc_charge_at_admission_reorders_the_rest_of_the_round():
    """Charging each admission moves its client behind the other: taking four from
    two clients' queues alternates between them, as VTC serves (one head at a time)."""
    policy = CounterOrdered(ServiceLedger())
    for n in range(4):
        policy.add(Req(n, "a", float(n), prompt=10))
        policy.add(Req(10 + n, "b", float(n) + 0.5, prompt=10))

    def charge(r: Req) -> None:
        policy.on_admitted(r, r.prompt)

    taken = take_in_order(policy, Limits(free=100, max_seqs=4), lambda r: 1, on_take=charge)
    assert [r.client_id for r in taken] == ["a", "b", "a", "b"]


def test_fcfs_blocks_behind_a_large_head():
    policy = FCFS()
    big, small = Req(0, "a", 0.0, prompt=50), Req(1, "b", 1.0, prompt=1)
    policy.add(big)
    policy.add(small)
    taken = take_in_order(policy, Limits(free=20, max_seqs=8), lambda r: r.prompt)
    assert taken == [] and policy.peek() is big


def test_watermark_is_a_share_of_the_capacity():
    assert watermark(1000) == 10 and watermark(50) == 0


@dataclass(eq=False)
class Running:
    rank: int  # the policy's preference to evict: the highest goes first
    held: int
    need: int


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3)), min_size=1, max_size=10),
    st.integers(0, 12),
)
def test_make_room_evicts_the_policys_victims_only_while_memory_is_short(specs, free0):
    running = [Running(rank, held, need) for rank, (held, need) in enumerate(specs)]
    free = [free0]

    def evict(r: Running) -> None:
        free[0] += r.held

    def grant(r: Running, n: int) -> None:
        assert n == r.need and n <= free[0]  # never more than is free
        free[0] -= n

    kept, evicted = make_room(
        running, lambda r: r.need, lambda: free[0],
        lambda rs: max(rs, key=lambda r: r.rank), evict, grant,
    )  # fmt: skip
    assert [r for r in running if r not in evicted] == kept  # order kept, nothing lost
    by_rank = sorted(running, key=lambda r: -r.rank)
    assert evicted == by_rank[: len(evicted)]  # always the victim among those left
    if sum(r.need for r in running) <= free0:
        assert evicted == []  # nothing is evicted while everything fits
    assert free[0] >= 0

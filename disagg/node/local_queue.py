"""A node's waiting requests, in merged-counter order: the node's scheduling policy.

The coordinator sends a node only what fits its advertised credit, so this queue stays
short; it orders by the counters the coordinator last published (a request arrives
carrying its client's counter at dispatch, lift included), then by arrival. Under FCFS
and RPM every counter is 0, so the order is arrival order. Admission takes from it by
the shared rule (:func:`disagg.scheduling.admission.take_in_order`: a head that does not
fit is not overtaken, as in VTC), and it names the preemption victim as the
coordinator's policy would: the running request of the most-served client.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as SeqList
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    rid: int
    client_id: str
    counter: float
    arrival: float


T = TypeVar("T", bound=Queued)


class CounterQueue(Generic[T]):
    def __init__(self) -> None:
        self._items: dict[int, T] = {}
        self.counters: dict[str, float] = {}
        # The waiting items sorted, last first (so the head pops off the end), kept
        # until a push or a publication changes the order; removals are skipped lazily.
        self._order: list[T] | None = None

    def push(self, item: T) -> None:
        self._items[item.rid] = item
        self._order = None

    def get(self, rid: int) -> T | None:
        return self._items.get(rid)

    def remove(self, rid: int) -> T | None:
        return self._items.pop(rid, None)

    def publish(self, counters: dict[str, float]) -> None:
        """A new publication: counters only grow, so keep the larger of the two."""
        own = self.counters
        for client, value in counters.items():
            if value > own.get(client, 0.0):
                own[client] = value
                self._order = None

    def counter(self, item: Queued) -> float:
        """``item``'s client's counter as this node knows it."""
        return max(item.counter, self.counters.get(item.client_id, 0.0))

    def _key(self, item: Queued) -> tuple[float, float, int]:
        return (self.counter(item), item.arrival, item.rid)

    def ordered(self) -> Iterator[T]:
        yield from sorted(self._items.values(), key=self._key)

    def peek(self) -> T | None:
        order = self._order
        if order is None:
            order = self._order = sorted(self._items.values(), key=self._key, reverse=True)
        items = self._items
        while order and items.get(order[-1].rid) is not order[-1]:
            order.pop()  # removed since the sort
        return order[-1] if order else None

    def pop(self) -> T:
        head = self.peek()
        if head is None:
            raise IndexError("pop from an empty queue")
        assert self._order is not None
        self._order.pop()
        del self._items[head.rid]
        return head

    def preemption_victim(self, running: SeqList[T]) -> T:
        """The running item to evict first: the most-served client's latest arrival, as
        :class:`~disagg.scheduling.CounterOrdered` (and, all counters 0, FCFS) choose."""
        return max(running, key=self._key)

    def __contains__(self, rid: int) -> bool:
        return rid in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

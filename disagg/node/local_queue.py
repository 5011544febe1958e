"""A node's waiting requests, in merged-counter order.

The coordinator sends a node only what fits its advertised credit, so this queue stays
short; it orders by the counters the coordinator last published (a request arrives
carrying its client's counter at dispatch, lift included), then by arrival. A head that
does not fit is not overtaken, as in VTC.
"""

from __future__ import annotations

from collections.abc import Iterator
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

    def push(self, item: T) -> None:
        self._items[item.rid] = item

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

    def ordered(self) -> Iterator[T]:
        counters = self.counters

        def key(item: T) -> tuple[float, float, int]:
            return (max(item.counter, counters.get(item.client_id, 0.0)), item.arrival, item.rid)

        yield from sorted(self._items.values(), key=key)

    def __contains__(self, rid: int) -> bool:
        return rid in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

"""The contract every scheduling policy meets, and first-come-first-served.

A policy owns the waiting queue's order and chooses preemption victims; the scheduler
owns memory and batching. Policies see requests only through the attributes they read
(``seq_id``, ``arrival_time``, ``client_id``, token counts), so the same objects can
drive the colocated engine, the prefill and decode nodes, and the simulator.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence as SeqList
from typing import Protocol

from disagg.errors import ConfigError


class Request(Protocol):
    seq_id: int
    arrival_time: float
    client_id: str


class SchedulingPolicy(ABC):
    """Orders waiting requests and picks which running request to preempt.

    Contract: ``add`` takes a request that arrives or returns after preemption;
    ``peek``/``pop`` give the request to admit next (``peek`` is None when empty); a
    request not admitted stays queued, in place. ``preemption_victim`` names the running
    request to evict when memory runs out. ``on_admitted`` / ``on_tokens`` report
    service, for policies that charge for it. Each operation is O(log n).
    """

    @abstractmethod
    def add(self, request: Request) -> None: ...

    @abstractmethod
    def peek(self) -> Request | None: ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def remove(self, request: Request) -> bool:
        """Drops a waiting request (e.g. aborted); False if it was not waiting."""

    @abstractmethod
    def preemption_victim(self, running: SeqList[Request]) -> Request: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def on_admitted(self, request: Request, num_input_tokens: int) -> None:  # noqa: B027
        """The request's prompt was admitted to a batch (input service)."""

    def on_tokens(self, request: Request, num_output_tokens: int) -> None:  # noqa: B027
        """The request produced output tokens (output service)."""


class FCFS(SchedulingPolicy):
    """Earliest arrival first; the latest arrival is preempted first. A preempted
    request keeps its arrival time, so it returns to the head of the queue."""

    def __init__(self) -> None:
        # Entries are (arrival, seq_id, ticket, request); an entry is live only while its
        # ticket is the one ``_live`` holds for that id, so removal is O(1) and lazy, and
        # a removed-then-re-added request is never queued twice.
        self._heap: list[tuple[float, int, int, Request]] = []
        self._live: dict[int, int] = {}
        self._tickets = itertools.count()

    def add(self, request: Request) -> None:
        ticket = next(self._tickets)
        self._live[request.seq_id] = ticket
        heapq.heappush(self._heap, (request.arrival_time, request.seq_id, ticket, request))

    def peek(self) -> Request | None:
        heap = self._heap
        while heap and self._live.get(heap[0][1]) != heap[0][2]:
            heapq.heappop(heap)  # removed or superseded
        return heap[0][3] if heap else None

    def pop(self) -> Request:
        head = self.peek()
        if head is None:
            raise IndexError("pop from an empty queue")
        heapq.heappop(self._heap)
        del self._live[head.seq_id]
        return head

    def remove(self, request: Request) -> bool:
        return self._live.pop(request.seq_id, None) is not None

    def preemption_victim(self, running: SeqList[Request]) -> Request:
        return max(running, key=lambda r: (r.arrival_time, r.seq_id))

    def __len__(self) -> int:
        return len(self._live)


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFS}


def make_policy(name: str) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError("policy", f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None

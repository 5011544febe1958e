"""First come, first served."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence as SeqList

from disagg.scheduling.policy import Request, SchedulingPolicy


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

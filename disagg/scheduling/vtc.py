"""The Virtual Token Counter family: serve the pending client with the smallest counter.

One class, :class:`CounterOrdered`, is VTC (colocated), LCF (a ledger without lift), and
each pool of per-stage and two-stage VTC: it differs only in which ledger it reads,
which charges it makes, and whether admission ends a request's pending span.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Mapping
from collections.abc import Sequence as SeqList
from typing import Protocol

from disagg.scheduling.cost import LinearCost, ServiceCost, input_charge, output_charge
from disagg.scheduling.ledger import ServiceLedger
from disagg.scheduling.policy import Request, SchedulingPolicy


class CounterSource(Protocol):
    """Where a pool reads counters and sends charges: the ledger itself, or a stale
    view of it (see :class:`StaleView`). ``version`` changes whenever a counter it
    reports may have changed."""

    version: int

    def counter(self, client: str) -> float: ...

    def charge(self, client: str, cost: float) -> None: ...


class StaleView:
    """A node's view of the merged counters: the last published snapshot plus the
    charges this node made since. ``refresh`` is the publication; between two, other
    pools' charges and lifts are invisible here. Counters seen never decrease, since a
    snapshot contains every charge made before it."""

    def __init__(self, ledger: ServiceLedger):
        self.ledger = ledger
        self._snapshot: dict[str, float] = {}
        self._local: dict[str, float] = {}
        self.version = 0
        self.refresh()

    def refresh(self) -> None:
        self._snapshot = self.ledger.counters()
        self._local.clear()
        self.version += 1

    def counter(self, client: str) -> float:
        return self._snapshot.get(client, 0.0) + self._local.get(client, 0.0)

    def observe(self, client: str) -> None:
        """Learns one client's live counter now: a request handed to this pool carries
        its client's counter (lift included), as a dispatch message would."""
        live = self.ledger.counter(client) - self._local.get(client, 0.0)
        if live > self._snapshot.get(client, 0.0):
            self._snapshot[client] = live
            self.version += 1

    def charge(self, client: str, cost: float) -> None:
        self.ledger.charge(client, cost)
        self._local[client] = self._local.get(client, 0.0) + cost / self.ledger.weight(client)
        self.version += 1


class CounterOrdered(SchedulingPolicy):
    """Pending client with the smallest counter first; within a client, earliest
    arrival first. The running request of the most-served client is preempted first.

    ``charge_input`` / ``charge_output``: which service this pool charges.
    ``ends_pending``: whether admission here ends the request's pending span in the
    ledger (True for the only or last stage). Ties between equal counters go to the
    client whose head request arrived first.
    """

    def __init__(
        self,
        ledger: ServiceLedger,
        cost: ServiceCost | None = None,
        *,
        view: CounterSource | None = None,
        charge_input: bool = True,
        charge_output: bool = True,
        ends_pending: bool = True,
    ):
        self.ledger = ledger
        self.view: CounterSource = view or ledger
        self.cost = cost or LinearCost()
        self.charge_input = charge_input
        self.charge_output = charge_output
        self.ends_pending = ends_pending
        self._queues: dict[str, list[tuple[float, int, int, Request]]] = {}
        self._live: dict[int, int] = {}  # seq_id -> ticket of its live queue entry
        self._count: dict[str, int] = {}  # client -> live waiting requests
        self._clients: list[tuple[float, float, str]] = []  # lazy (counter, head arrival, client)
        self._tickets = itertools.count()
        self._counter = self.view.counter
        self._observe = getattr(self.view, "observe", None)
        # peek()'s answer, valid while nothing it depends on changed: pop() right after
        # peek() (the common case) then skips the search.
        self._peeked: tuple[Request, int, int] | None = None
        self._mutations = 0
        # A linear cost (the default) is charged without calling it: a hot path.
        self._linear = (
            (self.cost.w_in, self.cost.w_out) if isinstance(self.cost, LinearCost) else None
        )

    # -- queue ---------------------------------------------------------------------

    def add(self, request: Request) -> None:
        client = request.client_id
        self._mutations += 1
        self.ledger.enter(request.seq_id, client)
        if self._observe is not None:
            self._observe(client)
        ticket = next(self._tickets)
        self._live[request.seq_id] = ticket
        arrival = request.arrival_time
        count = self._count.get(client, 0)
        if count:
            queue = self._queues[client]
            heapq.heappush(queue, (arrival, request.seq_id, ticket, request))
            self._count[client] = count + 1
            if queue[0][2] != ticket:
                return  # not the new head: the client's key stands
        else:
            self._queues[client] = [(arrival, request.seq_id, ticket, request)]
            self._count[client] = 1
        # Newly waiting, or a new head (a requeued request arrived earlier): a fresh key.
        # Older keys of the client are refreshed or dropped lazily.
        heapq.heappush(self._clients, (self._counter(client), arrival, client))
        if len(self._clients) > 4 * len(self._count) + 64:
            self._rebuild_client_heap()

    def peek(self) -> Request | None:
        heap, counts, counter = self._clients, self._count, self._counter
        while heap:
            key_counter, key_arrival, client = heap[0]
            if client not in counts:
                heapq.heappop(heap)
                continue
            head = self._head(client)
            current = counter(client)
            # Keys only grow (charges, lifts, later heads), so a key below the client's
            # present one is stale: refresh it and look again.
            if key_counter < current or (
                key_counter == current and key_arrival < head.arrival_time
            ):
                heapq.heapreplace(heap, (current, head.arrival_time, client))
                continue
            self._peeked = (head, self.view.version, self._mutations)
            return head
        return None

    def pop(self) -> Request:
        cached = self._peeked
        if cached is not None and cached[1] == self.view.version and cached[2] == self._mutations:
            head = cached[0]
        else:
            head = self.peek()
            if head is None:
                raise IndexError("pop from an empty queue")
        self._peeked = None
        self._mutations += 1
        client = head.client_id
        heapq.heappop(self._queues[client])
        del self._live[head.seq_id]
        self._drop_one(client)
        if self.ends_pending:
            self.ledger.leave(head.seq_id, client)
        return head

    def remove(self, request: Request) -> bool:
        if self._live.pop(request.seq_id, None) is None:
            return False
        self._mutations += 1
        self._drop_one(request.client_id)
        self.ledger.leave(request.seq_id, request.client_id)
        return True

    def __len__(self) -> int:
        return len(self._live)

    def num_waiting(self, client: str) -> int:
        return self._count.get(client, 0)

    def heads(self) -> Iterator[Request]:
        """Each waiting client's first request: the candidates the order picks among
        as counters change (a simulator checks whether any of them fits)."""
        for client in self._count:
            yield self._head(client)

    # -- service -------------------------------------------------------------------

    def preemption_victim(self, running: SeqList[Request]) -> Request:
        return max(
            running, key=lambda r: (self.view.counter(r.client_id), r.arrival_time, r.seq_id)
        )

    def on_admitted(self, request: Request, num_input_tokens: int) -> None:
        if self.charge_input and num_input_tokens:
            if self._linear is not None:
                amount = self._linear[0] * num_input_tokens
            else:
                amount = input_charge(self.cost, num_input_tokens)
            self.view.charge(request.client_id, amount)

    def on_finished(self, request: Request) -> None:
        self.ledger.leave(request.seq_id, request.client_id)

    def on_tokens(self, request: Request, num_output_tokens: int) -> None:
        if self.charge_output and num_output_tokens:
            if self._linear is not None:
                amount = self._linear[1] * num_output_tokens
            else:
                n_in = request.num_prompt_tokens
                before = request.num_output_tokens - num_output_tokens
                amount = output_charge(self.cost, n_in, before, num_output_tokens)
            self.view.charge(request.client_id, amount)

    def on_tokens_of(self, counts: Mapping[Request, int]) -> None:
        if not self.charge_output:
            return
        if self._linear is None:  # the charge depends on each request's length
            for request, n in counts.items():
                self.on_tokens(request, n)
            return
        per_client: dict[str, int] = {}  # one charge per client, whatever the batch
        for request, n in counts.items():
            per_client[request.client_id] = per_client.get(request.client_id, 0) + n
        rate, charge = self._linear[1], self.view.charge
        for client, n in per_client.items():
            if n:
                charge(client, rate * n)

    # -- internals -----------------------------------------------------------------

    def _head(self, client: str) -> Request:
        queue, live = self._queues[client], self._live
        while live.get(queue[0][1]) != queue[0][2]:
            heapq.heappop(queue)  # removed or superseded
        return queue[0][3]

    def _drop_one(self, client: str) -> None:
        left = self._count[client] - 1
        if left:
            self._count[client] = left
        else:
            del self._count[client]
            del self._queues[client]

    def _rebuild_client_heap(self) -> None:
        self._clients = [(self.view.counter(c), self._head(c).arrival_time, c) for c in self._count]
        heapq.heapify(self._clients)

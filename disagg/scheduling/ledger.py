"""Per-client virtual token counters, the state every VTC-family policy orders by.

A client's counter is the service it received divided by its weight. A client is
*pending* while it has a request between entering the first waiting queue and leaving
the last one (one queue when colocated; prefill queue through decode admission when
disaggregated). When a client becomes pending, VTC *lifts* its counter to the smallest
counter among pending clients, or, when none is pending, to the counter of the last
client that stopped pending — so time spent idle earns no credit.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping

from disagg.errors import ConfigError


class ServiceLedger:
    """Counters, pending bookkeeping and the lift; O(log n) per operation.

    ``lift=False`` gives LCF's counters (no lift: an idle client banks credit).
    ``forget_after`` bounds the state: a client idle that long whose counter is at or
    below the lift floor is dropped; since the floor never decreases, it would be lifted
    to at least that floor on return anyway, so forgetting changes no decision.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        default_weight: float = 1.0,
        lift: bool = True,
        forget_after: float | None = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        for client, w in (weights or {}).items():
            if not w > 0:
                raise ConfigError(f"weights.{client}", f"must be > 0, got {w!r}")
        if not default_weight > 0:
            raise ConfigError("default_weight", f"must be > 0, got {default_weight!r}")
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self.lift_enabled = lift
        self.forget_after = forget_after
        self.clock = clock  # seconds; the simulator passes its own
        self._counters: dict[str, float] = {}
        self.version = 0  # bumped whenever a counter changes (readers cache against it)
        self._pending: dict[str, int] = {}  # client -> pending request count (> 0)
        self._pending_ids: set[int] = set()
        self._min_heap: list[tuple[float, str]] = []  # lazy: pending clients by counter
        self.last_left = 0.0  # the last leaver's counter when it left
        self._last_leaver: str | None = None
        # Clients that stopped pending, oldest first; an entry is current only while its
        # time equals _left_at[client] (a client that came back and left again has a
        # newer entry further on).
        self._idle: deque[tuple[float, str]] = deque()
        self._left_at: dict[str, float] = {}

    # -- reading -------------------------------------------------------------------

    def counter(self, client: str) -> float:
        return self._counters.get(client, 0.0)

    def weight(self, client: str) -> float:
        return self.weights.get(client, self.default_weight)

    def is_pending(self, client: str) -> bool:
        return client in self._pending

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def __len__(self) -> int:
        """Clients with state (pending or remembered)."""
        return len(self._counters)

    def floor(self) -> float:
        """What a newly pending client is lifted to: the smallest pending counter, or,
        when no client is pending, the counter of the last client that stopped pending
        (as it is now: service it received after leaving the queue counts too)."""
        heap = self._min_heap
        while heap:
            value, client = heap[0]
            if client not in self._pending:
                heapq.heappop(heap)
            elif value < self._counters[client]:
                heapq.heapreplace(heap, (self._counters[client], client))
            else:
                return value
        return (
            self._counters.get(self._last_leaver, self.last_left)
            if self._last_leaver
            else self.last_left
        )

    # -- writing -------------------------------------------------------------------

    def charge(self, client: str, cost: float) -> None:
        """Adds ``cost`` weighted service to the client's counter."""
        counters = self._counters
        counters[client] = counters.get(client, 0.0) + cost / self.weights.get(
            client, self.default_weight
        )
        self.version += 1

    def enter(self, request_id: int, client: str) -> None:
        """A request starts pending (idempotent per request id)."""
        if request_id in self._pending_ids:
            return
        self._pending_ids.add(request_id)
        count = self._pending.get(client, 0)
        if count == 0:
            if self.lift_enabled:
                floor = self.floor()  # over the others: this client is not pending yet
                if self._counters.get(client, 0.0) < floor:
                    self._counters[client] = floor
                    self.version += 1
            self._counters.setdefault(client, 0.0)
            self._pending[client] = 1
            heapq.heappush(self._min_heap, (self._counters[client], client))
            self._forget_idle(self.clock())
        else:
            self._pending[client] = count + 1

    def leave(self, request_id: int, client: str) -> None:
        """A request stops pending (admitted to its last stage, or aborted)."""
        if request_id not in self._pending_ids:
            return
        self._pending_ids.discard(request_id)
        count = self._pending[client] - 1
        if count:
            self._pending[client] = count
            return
        del self._pending[client]
        self.last_left = self._counters[client]
        self._last_leaver = client
        now = self.clock()
        self._left_at[client] = now
        self._idle.append((now, client))

    def _forget_idle(self, now: float) -> None:
        if self.forget_after is None:
            return
        floor = self.floor()
        for _ in range(len(self._idle)):
            since, client = self._idle[0]
            if now - since < self.forget_after:
                break
            self._idle.popleft()
            if client in self._pending or self._left_at.get(client) != since:
                continue  # active again, or a newer entry stands for it
            if self._counters.get(client, floor) <= floor:
                self._counters.pop(client, None)
                del self._left_at[client]
            else:  # still ahead of the floor: look again later
                self._left_at[client] = now
                self._idle.append((now, client))

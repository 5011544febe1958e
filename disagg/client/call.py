"""One request in flight, as the client's receive side and the caller share it."""

from __future__ import annotations

import asyncio
import os
from collections import deque

from disagg.client.results import StreamChunk
from disagg.errors import DisaggError
from disagg.protocol import ServerMessage

Item = ServerMessage | StreamChunk | DisaggError


def new_request_id() -> str:
    """32 random hex digits, as unique as ``uuid4().hex`` and a fifth of its cost."""
    return os.urandom(16).hex()


class Call:
    """One request in flight: what the receive side has delivered, and where it stands.

    The receive side appends to a deque and wakes the caller only if it is waiting: no
    queue object per call, and a caller that finds items already there takes them
    without suspending. The deadline is one timer per call, not one per wait: a wait
    moves :attr:`deadline`, and the timer, when it fires early, re-arms for the new one.
    """

    __slots__ = (
        "_armed_for",
        "_items",
        "_timer",
        "_waiter",
        "deadline",
        "heard",
        "next_index",
        "request_id",
        "settled",
        "submitted",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.submitted = False  # registered and handed to the socket
        self.heard = False  # any message for this request arrived
        self.settled = False  # ended by the coordinator, or Abort sent
        self.next_index = 0  # output position the next streamed chunk must start at
        self.deadline: float | None = None  # loop time past which a wait raises TimeoutError
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0  # the deadline the timer was set for

    def put(self, item: Item) -> None:
        """Delivers ``item`` (an exception is raised to the caller in its turn)."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, wait_s: float | None = None) -> ServerMessage | StreamChunk:
        """The next item, waiting for one if none is there. Raises an item that is an
        exception, and :class:`TimeoutError` once :attr:`deadline` passes; ``wait_s``
        first moves the deadline to that many seconds from now (a bound on this wait)."""
        items = self._items
        if not items:  # wait (inline: a coroutine less per wait, and this runs per token)
            loop = asyncio.get_running_loop()
            if wait_s is not None:
                self.deadline = loop.time() + wait_s
            if self.deadline is not None and self._timer is None:
                self._timer = loop.call_at(self.deadline, self._on_timer)
                self._armed_for = self.deadline
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if isinstance(item, DisaggError):
            raise item
        return item

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait arms a timer of its own
        assert self.deadline is not None
        if self.deadline > self._armed_for:  # the wait began after the timer was set
            self._timer = asyncio.get_running_loop().call_at(self.deadline, self._on_timer)
            self._armed_for = self.deadline
            return
        waiter.set_exception(TimeoutError())

"""One request in flight, as the client's receive task and the caller share it."""

from __future__ import annotations

import asyncio

from disagg.client.results import StreamChunk
from disagg.errors import DisaggError
from disagg.protocol import ServerMessage


class Call:
    """One request in flight: what the receive task has delivered, and where it stands."""

    __slots__ = ("heard", "next_index", "queue", "request_id", "settled", "submitted")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[ServerMessage | StreamChunk | DisaggError] = asyncio.Queue()
        self.submitted = False  # registered and handed to the socket
        self.heard = False  # any message for this request arrived
        self.settled = False  # ended by the coordinator, or Abort sent
        self.next_index = 0  # output position the next streamed chunk must start at

    async def next(self) -> ServerMessage | StreamChunk:
        item = await self.queue.get()
        if isinstance(item, DisaggError):
            raise item
        return item

"""The async iterator a streamed request returns."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from disagg.client.call import Call, new_request_id
from disagg.client.request import Request, exception_for
from disagg.client.results import Completion, StreamChunk
from disagg.errors import RequestFailed
from disagg.protocol import Error, Finished

if TYPE_CHECKING:
    from disagg.client.async_client import AsyncClient


class AsyncStream:
    """Async iterator of :class:`StreamChunk`; ends when the request finishes, and then
    :attr:`completion` holds the final :class:`Completion`. Leaving early (``break``
    inside ``async with``, :meth:`aclose`, a cancelled task) aborts the request."""

    def __init__(self, client: AsyncClient, request: Request) -> None:
        self._client = client
        self._request = request
        self._call = Call(new_request_id())
        self._started = False
        self._closed = False
        self.completion: Completion | None = None

    @property
    def request_id(self) -> str:
        return self._call.request_id

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._closed:
            raise StopAsyncIteration
        call = self._call
        try:
            if not self._started:
                self._started = True
                self._client._submit(call, self._request, stream=True)
            while True:
                msg = await call.next(self._request.timeout)
                if type(msg) is StreamChunk:
                    if msg.index != call.next_index:
                        raise RequestFailed(
                            f"request {call.request_id}: the coordinator sent tokens at "
                            f"output position {msg.index}, expected {call.next_index}",
                            request_id=call.request_id,
                        )
                    call.next_index += len(msg.token_ids)
                    return msg
                if isinstance(msg, Finished):
                    self.completion = Completion.from_message(msg)
                    raise StopAsyncIteration
                if isinstance(msg, Error):
                    raise exception_for(msg, self._client.address)
        except BaseException as e:  # the end, an error, a timeout or a cancellation: all final
            self._closed = True
            self._client._release(call)
            if isinstance(e, TimeoutError):
                timeout = self._request.timeout
                raise self._client._timeout_error(call, timeout, "send anything") from None
            raise

    async def aclose(self) -> None:
        """Stops the stream; aborts the request if it has not finished."""
        if not self._closed:
            self._closed = True
            self._client._release(self._call)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # A stream dropped mid-way (``break`` without ``async with``) still aborts; the
        # release must run on the client's loop, which may live in another thread.
        if self._started and not self._closed and not self._call.settled:
            loop = self._client._loop
            if loop is not None and not loop.is_closed():
                # RuntimeError: the loop closed in between, and close() aborted the call.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._client._release, self._call)

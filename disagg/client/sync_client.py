"""The blocking client, safe to share between threads.

ZeroMQ sockets must not be used from two threads at once, so the socket never leaves one
thread: the client runs an :class:`AsyncClient` on a private event loop in a background
thread, and every call hands a coroutine to that loop (``run_coroutine_threadsafe``) and
waits for its result. Many threads then share one socket and one receive task, and
their requests are in flight together, exactly as with ``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from disagg.client.async_client import DEFAULT_CLIENT_MAX_MESSAGE_BYTES, AsyncClient
from disagg.client.async_stream import AsyncStream
from disagg.client.results import Completion, StreamChunk
from disagg.errors import RequestFailed

T = TypeVar("T")

# How long close() lets calls that it failed unwind before cancelling them; they only
# have to read the failure already on their queue, so this is never reached in practice.
_SHUTDOWN_GRACE_S = 5.0


class Client:
    """Blocking twin of :class:`AsyncClient` (same arguments, same errors); a context
    manager. Call :meth:`close` when done: it aborts requests still in flight."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 60.0,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_CLIENT_MAX_MESSAGE_BYTES,
        server_key: str | None = None,
    ) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"disagg-client {address}", daemon=True
        )
        self._thread.start()
        try:
            # Made on the loop's thread, so the socket is created where it is used.
            self._async: AsyncClient = self._run(
                _make_client(address, timeout, api_key, max_message_bytes, server_key)
            )
        except BaseException:
            self._stop_loop()
            raise

    @property
    def timeout(self) -> float | None:
        return self._async.timeout

    def generate(
        self,
        prompt: str | list[int],
        *,
        client_id: str,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Completion:
        """See :meth:`AsyncClient.generate`."""
        return self._run(
            self._async.generate(prompt, client_id=client_id, timeout=timeout, **sampling)
        )

    def stream(
        self,
        prompt: str | list[int],
        *,
        client_id: str,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Stream:
        """See :meth:`AsyncClient.stream`; the request is checked here, in the caller."""
        self._check_open()
        return Stream(
            self, self._async.stream(prompt, client_id=client_id, timeout=timeout, **sampling)
        )

    def ping(self, *, timeout: float | None = None) -> float:
        return self._run(self._async.ping(timeout=timeout))

    def close(self) -> None:
        """Aborts requests in flight, closes the socket and stops the loop. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        finally:
            self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the loop thread -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RequestFailed(f"the client for {self.address} is closed")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        # Submitting under the lock orders every call before close(): a coroutine handed
        # to the loop always runs before the loop stops, so no caller waits forever.
        with self._lock:
            if self._closed:
                coro.close()
                self._check_open()
            done = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return done.result()
        except BaseException:
            # Interrupted while waiting (e.g. KeyboardInterrupt): cancelling the task on
            # the loop aborts the request. A no-op when the coroutine already finished.
            done.cancel()
            raise

    async def _shutdown(self) -> None:
        await self._async.close()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            _, late = await asyncio.wait(others, timeout=_SHUTDOWN_GRACE_S)
            for task in late:
                task.cancel()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _make_client(
    address: str,
    timeout: float,
    api_key: str | None,
    max_message_bytes: int,
    server_key: str | None,
) -> AsyncClient:
    client = AsyncClient(
        address,
        timeout=timeout,
        api_key=api_key,
        max_message_bytes=max_message_bytes,
        server_key=server_key,
    )
    client._ensure_started()
    return client


class Stream:
    """Iterator of :class:`StreamChunk`; :attr:`completion` is set when it ends. Use it
    in a ``with`` block (or call :meth:`close`) to abort a stream left early; a stream
    dropped without closing is aborted when it is garbage-collected."""

    def __init__(self, client: Client, stream: AsyncStream) -> None:
        self._client = client
        self._stream = stream

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    @property
    def completion(self) -> Completion | None:
        return self._stream.completion

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamChunk:
        try:
            return self._client._run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        if not self._client._closed:
            self._client._run(self._stream.aclose())

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

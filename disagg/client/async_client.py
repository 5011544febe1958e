"""The asyncio client: one DEALER socket, many requests in flight.

Every request is a :class:`Call` registered under its id; the event loop's reader
callback on the socket decodes each reply and hands it to that call, and the coroutine
that made the request takes it from there. So requests never wait on each other, and a
reply the client cannot read fails only the request it names.

The socket is a plain ZeroMQ socket read from the loop's reader callback on its FD, not
a ``zmq.asyncio`` one (which costs a future and several callbacks per message). That FD
signals edges, not levels: a callback takes messages while ``EVENTS`` says ``POLLIN``,
and since a send can consume an edge, every send looks at ``EVENTS`` again.

Invariant: a call is *settled* once the coordinator has ended it (``Finished`` or
``Error``) or the client has sent ``Abort`` for it. A call that ends any other way (a
timeout, a cancelled task, a stream closed early, a reply it could not read) is aborted
when it is released, so the coordinator never works for a caller that has gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from typing import Any

import zmq

from disagg.client.async_stream import AsyncStream
from disagg.client.call import Call, new_request_id
from disagg.client.request import Request, check_timeout, exception_for, prepare_request
from disagg.client.results import Completion, StreamChunk
from disagg.errors import (
    ConfigError,
    DisaggError,
    ProtocolError,
    RequestFailed,
    ServerUnavailable,
)
from disagg.protocol import (
    Abort,
    Accepted,
    Error,
    Finished,
    Generate,
    Ping,
    Pong,
    Sampling,
    Tokens,
    decode_reply,
    encode,
)
from disagg.protocol.sockets import POLLIN, POLLOUT, events, recv_frames, send_frames
from disagg.sampling_params import SamplingParams

_log = logging.getLogger(__name__)

# A client trusts its coordinator, and a Finished message carries the whole output and
# prompt as token ids: allow far more than the coordinator allows a client.
DEFAULT_CLIENT_MAX_MESSAGE_BYTES = 64 << 20
# How long a closed socket keeps trying to deliver the Aborts sent just before closing.
# ZeroMQ does this in its I/O thread: close() itself never blocks.
_CLOSE_LINGER_MS = 1000
# Messages one reader callback takes before it lets the loop's other callbacks run.
_MAX_MESSAGES_PER_CALLBACK = 64


class AsyncClient:
    """A connection to the coordinator's client endpoint, for one event loop.

    ``timeout`` is the default per call (seconds; ``math.inf`` for none). The socket
    connects at once (ZeroMQ connects in the background and queues messages meanwhile);
    the client starts reading it on first use. Use ``async with`` or call :meth:`close`,
    which aborts requests still in flight.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 60.0,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_CLIENT_MAX_MESSAGE_BYTES,
        context: zmq.Context | None = None,
        server_key: str | None = None,
    ) -> None:
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < 1
        ):
            raise ConfigError(
                "max_message_bytes", f"must be an integer >= 1, got {max_message_bytes!r}"
            )
        if not isinstance(address, str) or "://" not in address:
            raise ConfigError(
                "address", f"must be a ZeroMQ endpoint such as tcp://host:port, got {address!r}"
            )
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigError("api_key", f"must be a string or None, got {type(api_key).__name__}")
        self.address = address
        self.timeout = check_timeout(timeout)
        self._api_key = api_key
        self._max_message_bytes = max_message_bytes
        # A plain socket even from a zmq.asyncio context: the loop's reader callback reads it.
        sock = zmq.Socket(context or zmq.Context.instance(), zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A routing id of our own survives reconnects, so replies to requests in flight
        # still reach us after a dropped TCP connection (the coordinator's ROUTER sets
        # ROUTER_HANDOVER). A leading zero byte is reserved by ZeroMQ, hence the prefix.
        self.routing_id = b"c" + uuid.uuid4().bytes
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if server_key is not None:  # CurveZMQ: encrypt, and talk only to that server
            from disagg.protocol.curve import configure_curve_client

            try:
                configure_curve_client(sock, server_key)
            except BaseException:
                sock.close()
                raise
        try:
            sock.connect(address)
        except zmq.ZMQError as e:
            sock.close()
            raise ConfigError("address", f"cannot connect to {address!r}: {e}") from None
        self._sock = sock
        self._fd: int = sock.getsockopt(zmq.FD)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Messages the socket could not take yet (its pipe full), in order, with the id of
        # the request each starts (None for the others).
        self._outbox: deque[tuple[str | None, list[bytes]]] = deque()
        self._calls: dict[str, Call] = {}
        self._pings: dict[str, asyncio.Future[None]] = {}
        self._closed = False
        self._events_check_scheduled = False
        self._broken: str | None = None  # why the client stopped receiving, if it did

    # -- public API ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet ended."""
        return len(self._calls)

    async def generate(
        self,
        prompt: str | list[int],
        *,
        client_id: str,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Completion:
        """Runs one request to its end. ``timeout`` bounds the whole call (the coordinator
        sends nothing between ``Accepted`` and ``Finished``)."""
        request = prepare_request(prompt, client_id, timeout, sampling, self.timeout)
        loop = self._ensure_started()
        call = Call(new_request_id())
        if request.timeout is not None:
            call.deadline = loop.time() + request.timeout
        try:
            self._submit(call, request, stream=False)
            while True:
                msg = await call.next()
                if isinstance(msg, Finished):
                    return Completion.from_message(msg)
                if isinstance(msg, Error):
                    raise exception_for(msg, self.address)
                # Accepted (and tokens, should the coordinator stream anyway): progress.
        except TimeoutError:
            raise self._timeout_error(call, request.timeout, "finish") from None
        finally:
            self._release(call)

    def stream(
        self,
        prompt: str | list[int],
        *,
        client_id: str,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncStream:
        """Checks the request now and returns an async iterator of :class:`StreamChunk`;
        the request is sent on the first ``__anext__``. ``timeout`` bounds each wait for
        the next message, so a long stream that keeps moving never times out."""
        request = prepare_request(prompt, client_id, timeout, sampling, self.timeout)
        if self._closed:
            raise RequestFailed(f"the client for {self.address} is closed")
        return AsyncStream(self, request)

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round-trip time to the coordinator in seconds; :class:`ServerUnavailable` when
        no ``Pong`` comes within ``timeout``."""
        limit = self.timeout if timeout is None else check_timeout(timeout)
        loop = self._ensure_started()
        nonce = uuid.uuid4().hex
        pong = loop.create_future()
        self._pings[nonce] = pong
        start = time.perf_counter()  # uvloop.time() ticks in whole milliseconds
        try:
            async with asyncio.timeout(limit):
                self._send(encode(Ping(nonce=nonce)))
                await pong
        except TimeoutError:
            raise ServerUnavailable(
                f"no pong from the coordinator at {self.address} within {limit:g} s; "
                "is it running and reachable?",
                address=self.address,
                timeout=limit,
            ) from None
        finally:
            self._pings.pop(nonce, None)
        return time.perf_counter() - start

    async def close(self) -> None:
        """Aborts the requests still in flight (their callers get :class:`RequestFailed`)
        and closes the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for call in list(self._calls.values()):
            self._release(call)
            call.put(
                RequestFailed(
                    f"the client was closed while request {call.request_id} was in flight; "
                    "it was aborted",
                    request_id=call.request_id,
                )
            )
        for pong in self._pings.values():
            if not pong.done():
                pong.set_exception(RequestFailed("the client was closed during a ping"))
        self._pings.clear()
        self._stop_reading()
        if self._outbox:  # a last try; the linger delivers what the socket takes
            self._flush_outbox()
        self._sock.close(linger=_CLOSE_LINGER_MS)

    async def __aenter__(self) -> AsyncClient:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RequestFailed(f"the client for {self.address} is closed")
        if self._broken is not None:
            raise RequestFailed(f"the client for {self.address} stopped: {self._broken}")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._fd, self._on_events)
        elif loop is not self._loop:
            raise RuntimeError("an AsyncClient serves one event loop; make one per loop")
        return loop

    def _submit(self, call: Call, request: Request, *, stream: bool) -> None:
        self._ensure_started()
        frames = encode(
            Generate(
                request_id=call.request_id,
                client_id=request.client_id,
                api_key=self._api_key,
                prompt=request.prompt,
                sampling=_sampling(request.params),
                stream=stream,
            )
        )
        self._calls[call.request_id] = call
        call.submitted = True
        self._send(frames, starts=call.request_id)

    def _release(self, call: Call) -> None:
        """The caller is done with ``call``: forget it, and abort it unless settled."""
        self._calls.pop(call.request_id, None)
        call.cancel_timer()
        if call.settled or not call.submitted:
            return
        call.settled = True
        if self._sock.closed:
            return  # close() already aborted every call it knew
        if self._outbox and self._drop_unsent(call.request_id):
            return  # its Generate never left: there is nothing to abort
        try:
            self._send(encode(Abort(request_id=call.request_id)))
        except zmq.ZMQError as e:
            _log.warning("could not send an abort to %s: %s", self.address, e)

    def _timeout_error(self, call: Call, timeout: float | None, what: str) -> DisaggError:
        # Nothing heard: the coordinator is down, unreachable or swamped, and as far as we
        # know never took the request, so retrying elsewhere is safe (ServerUnavailable).
        # Heard: the coordinator owns a request that stopped moving (RequestFailed).
        if not call.heard:
            return ServerUnavailable(
                f"no answer from the coordinator at {self.address} within {timeout:g} s "
                f"(request {call.request_id}); is it running and reachable?",
                address=self.address,
                timeout=timeout,
            )
        return RequestFailed(
            f"request {call.request_id} was accepted by {self.address} but did not {what} "
            f"within {timeout:g} s; it was aborted",
            request_id=call.request_id,
        )

    # -- the socket -----------------------------------------------------------------

    def _send(self, frames: list[bytes], *, starts: str | None = None) -> None:
        """Hands ``frames`` to the socket without blocking; what it cannot take yet (its
        pipe is full) waits, in order, until the socket says ``POLLOUT``. ``starts``: the
        request these frames start."""
        if self._outbox or not self._try_send(frames):
            self._outbox.append((starts, frames))
        # A send processes the socket's pending commands, which can consume the edge that
        # would have woken the reader: look at the events again, once per turn of the loop.
        if not self._events_check_scheduled:
            self._events_check_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._on_events)

    def _try_send(self, frames: list[bytes]) -> bool:
        try:
            send_frames(self._sock, frames)
        except zmq.Again:  # the pipe is full (ZeroMQ took none of the message)
            return False
        return True

    def _flush_outbox(self) -> None:
        outbox = self._outbox
        while outbox and self._try_send(outbox[0][1]):
            outbox.popleft()

    def _drop_unsent(self, request_id: str) -> bool:
        for i, (starts, _) in enumerate(self._outbox):
            if starts == request_id:
                del self._outbox[i]
                return True
        return False

    def _on_events(self) -> None:
        """The loop's reader callback on the socket's FD, and the check after sends: sends
        what waits for room, then dispatches the replies queued, at most
        ``_MAX_MESSAGES_PER_CALLBACK`` before letting other callbacks run."""
        self._events_check_scheduled = False
        if self._closed or self._broken is not None:
            return
        sock = self._sock
        try:
            now = events(sock)
            if self._outbox and now & POLLOUT:
                self._flush_outbox()
                now = events(sock)
            for _ in range(_MAX_MESSAGES_PER_CALLBACK):
                if not now & POLLIN:
                    return
                self._dispatch(recv_frames(sock))
                now = events(sock)
        except Exception as e:  # a client that stopped reading must fail every caller
            self._stop_receiving(e)
            return
        # More may be queued, and the FD will not signal it again: come back after the
        # loop's other callbacks.
        self._events_check_scheduled = True
        assert self._loop is not None
        self._loop.call_soon(self._on_events)

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)

    def _stop_receiving(self, e: Exception) -> None:
        _log.error("the client for %s stopped receiving", self.address, exc_info=e)
        self._broken = f"{type(e).__name__}: {e}"
        self._stop_reading()
        for call in list(self._calls.values()):
            self._fail(call, RequestFailed(f"the client stopped receiving: {self._broken}"))
        for pong in self._pings.values():
            if not pong.done():
                pong.set_exception(RequestFailed(f"the client stopped: {self._broken}"))

    # -- replies ---------------------------------------------------------------------

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            msg = decode_reply(frames, max_bytes=self._max_message_bytes)
        except ProtocolError as e:
            self._on_unreadable(e)
            return
        if msg.type == "batch":  # several replies decided at once: each as if alone
            for one in msg.messages:
                self._take(one)
        else:
            self._take(msg)

    def _take(self, msg: Accepted | Tokens | Finished | Error | Pong) -> None:
        if msg.type == "tokens":
            self._take_tokens(msg)
            return
        if msg.type == "pong":
            pong = self._pings.pop(msg.nonce, None)
            if pong is not None and not pong.done():
                pong.set_result(None)
            return
        if msg.request_id is None:  # an Error not tied to a request
            self._on_untied_error(msg)
            return
        call = self._calls.get(msg.request_id)
        if call is None:
            # Late replies for requests that timed out or were aborted are expected.
            _log.debug("ignoring %s for request %s, no longer in flight", msg.type, msg.request_id)
            return
        call.heard = True
        if msg.type in ("finished", "error"):
            call.settled = True
            del self._calls[msg.request_id]
        call.put(msg)

    def _take_tokens(self, msg: Tokens) -> None:
        """A request's consecutive tokens in the message, as one chunk, to its request
        (tokens of requests no longer in flight are expected after a timeout or an
        abort, and dropped)."""
        calls, ids, indices = self._calls, msg.request_ids, msg.indices
        n, i = len(ids), 0
        while i < n:
            request_id, j = ids[i], i + 1
            while j < n and ids[j] == request_id and indices[j] == indices[j - 1] + 1:
                j += 1
            call = calls.get(request_id)
            if call is not None:
                call.heard = True
                texts = msg.texts[i] if j == i + 1 else "".join(msg.texts[i:j])
                call.put(StreamChunk(indices[i], msg.token_ids[i:j], texts))
            i = j

    def _on_unreadable(self, e: ProtocolError) -> None:
        _log.warning("unreadable message from %s: %s", self.address, e)
        named = e.request_ids or ((e.request_id,) if e.request_id is not None else ())
        for request_id in named:  # (a tokens message names several)
            call = self._calls.get(request_id)
            if call is None:
                continue
            self._fail(
                call,
                RequestFailed(
                    f"the coordinator at {self.address} sent a reply to request "
                    f"{call.request_id} that the client cannot read ({e}); it was aborted",
                    request_id=call.request_id,
                ),
            )

    def _on_untied_error(self, err: Error) -> None:
        # The coordinator could not tell which request a message of ours was: it can only
        # be one it has not answered yet, so those fail; answered ones carry on.
        _log.warning("error from %s not tied to a request: %s", self.address, err.message)
        for call in [c for c in self._calls.values() if not c.heard]:
            self._fail(call, exception_for(err, self.address))

    def _fail(self, call: Call, exc: DisaggError) -> None:
        # Not settled, and still registered until the caller releases it: the release
        # (or close(), if that comes first) sends the Abort.
        call.heard = True
        call.put(exc)


@functools.lru_cache(maxsize=256)
def _sampling(params: SamplingParams) -> Sampling:
    # Callers mostly repeat a few settings; both types are immutable, so share the result.
    return Sampling.from_params(params)

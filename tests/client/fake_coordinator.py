"""A scripted stand-in for the coordinator's client endpoint, for tests only.

A ROUTER bound to a random port on 127.0.0.1, in its own thread and event loop (so a
client under test may run on asyncio, uvloop or its own thread). Each ``Generate`` runs a
*script*: a function of the request returning the steps to play back (messages, raw
frames, delays). It records every client message, answers pings, cancels a script when
its request is aborted, and replies to unreadable messages as a coordinator must.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from disagg.errors import ProtocolError
from disagg.protocol import (
    Abort,
    Accepted,
    ClientMessage,
    Finished,
    Generate,
    Message,
    Nodes,
    Ping,
    Pong,
    Timings,
    Tokens,
    decode_request,
    encode,
    error_reply,
)


@dataclass(frozen=True)
class Raw:
    """Frames sent as they are (after the identity), for malformed replies."""

    frames: list[bytes]


@dataclass(frozen=True)
class Delay:
    seconds: float


Step = Message | Raw | Delay
Script = Callable[[Generate], Iterable[Step]]


def prompt_ids(gen: Generate) -> list[int]:
    return [ord(c) for c in gen.prompt] if isinstance(gen.prompt, str) else list(gen.prompt)


def tokens(request_id: str, index: int, token_ids: list[int], text: str) -> Tokens:
    """A chunk of one request's output as columns: ``token_ids`` from output position
    ``index`` on, ``text`` with the first of them."""
    n = len(token_ids)
    return Tokens(
        request_ids=[request_id] * n,
        indices=list(range(index, index + n)),
        token_ids=token_ids,
        texts=[text, *[""] * (n - 1)] if n else [],
    )


def expected_output(gen: Generate) -> list[int]:
    """What the echo script generates: the prompt reversed, cut at max_tokens."""
    return prompt_ids(gen)[::-1][: gen.sampling.max_tokens]


def echo(gen: Generate, *, chunk: int = 2, jitter: float = 0.002) -> list[Step]:
    """Accepted, then (streamed requests) Tokens in chunks of ``chunk``, then Finished.
    Token id t decodes to chr(t), so the text is checkable."""
    rid = gen.request_id
    ids, out = prompt_ids(gen), expected_output(gen)
    steps: list[Step] = [Accepted(request_id=rid, prompt_token_ids=ids)]
    if gen.stream:
        for i in range(0, len(out), chunk):
            steps.append(Delay(jitter))
            part = out[i : i + chunk]
            steps.append(tokens(rid, i, part, _text(part)))
    steps.append(Delay(jitter))
    steps.append(
        Finished(
            request_id=rid,
            finish_reason="length" if len(out) == gen.sampling.max_tokens else "stop",
            token_ids=out,
            text=_text(out),
            prompt_token_ids=ids,
            timings=Timings(
                queue_s=0.001, ttft_s=0.01, tpot_s=0.002, kv_transfer_s=0.003, total_s=0.05
            ),
            nodes=Nodes(prefill="prefill-0", decode="decode-1"),
        )
    )
    return steps


def _text(ids: list[int]) -> str:
    return "".join(map(chr, ids))


class FakeCoordinator:
    def __init__(self, script: Script = echo) -> None:
        self.script = script
        self.received: list[ClientMessage] = []
        self.sent: list[tuple[str, str]] = []  # (message type, request id) in send order
        self.bad_messages: list[ProtocolError] = []
        self.silent = False  # record, but answer nothing (a coordinator that hangs)
        self.address = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="fake-coordinator", daemon=True)
        self._error: BaseException | None = None

    # -- test-side API (any thread) ------------------------------------------------

    def __enter__(self) -> FakeCoordinator:
        self._thread.start()
        if not self._ready.wait(5) or self._error is not None:
            raise RuntimeError(f"the fake coordinator did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._main is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # already stopped
                self._loop.call_soon_threadsafe(self._main.cancel)
        self._thread.join(5)
        assert not self._thread.is_alive(), "the fake coordinator did not stop"

    def requests(self) -> list[Generate]:
        return [m for m in self.received if isinstance(m, Generate)]

    def aborted(self) -> set[str]:
        return {m.request_id for m in self.received if isinstance(m, Abort)}

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()

    async def await_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.005)
        return predicate()

    # -- the fake's own thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # surfaced to the test by __enter__ / the assertions
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        tasks: dict[tuple[bytes, str], asyncio.Task[None]] = {}
        try:
            sock.bind("tcp://127.0.0.1:*")
            self.address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._ready.set()
            while True:
                identity, *frames = await sock.recv_multipart()
                try:
                    msg = decode_request(frames)
                except ProtocolError as e:
                    self.bad_messages.append(e)
                    await sock.send_multipart([identity, *encode(error_reply(e))])
                    continue
                self.received.append(msg)
                if isinstance(msg, Abort):
                    task = tasks.pop((identity, msg.request_id), None)
                    if task is not None:
                        task.cancel()
                elif self.silent:
                    continue
                elif isinstance(msg, Ping):
                    await sock.send_multipart([identity, *encode(Pong(nonce=msg.nonce))])
                else:
                    key = (identity, msg.request_id)
                    tasks[key] = asyncio.create_task(self._play(sock, identity, msg))
                    tasks[key].add_done_callback(lambda _t, key=key: tasks.pop(key, None))
        finally:
            for task in tasks.values():
                task.cancel()
            sock.close(linger=0)
            ctx.term()

    async def _play(self, sock: zmq.asyncio.Socket, identity: bytes, gen: Generate) -> None:
        for step in self.script(gen):
            if self.silent:
                return
            if isinstance(step, Delay):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Raw):  # (recorded first: the client may act on it at once)
                self.sent.append(("raw", gen.request_id))
                await sock.send_multipart([identity, *step.frames])
            else:
                self.sent.append((step.type, gen.request_id))
                await sock.send_multipart([identity, *encode(step)])

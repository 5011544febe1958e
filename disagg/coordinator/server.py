"""The coordinator's shell: the sockets, the clock and the event loop around the core.

Two ZeroMQ ROUTERs: one for clients (``docs/protocol.md``), one for nodes
(``disagg.protocol.cluster``). The shell decodes each frame into a message, hands it to
the :class:`~disagg.coordinator.core.CoordinatorCore` with the time, and keeps what the
core returns; once per turn of the event loop it asks the core to dispatch and sends
all of it, one message per peer (a ``batch`` of several where needed); every
``publish_interval_s`` it ticks the core's timers. Every decision is the core's.

Runs on one asyncio loop (uvloop when installed by ``main``); every handler is
synchronous and short, so no locks. The sockets are plain (blocking-free) ZeroMQ
sockets read from the loop's reader callbacks on their file descriptors, not
zmq.asyncio's: that costs a future and several callbacks per message, a quarter of the
coordinator's Python time (py-spy) at tens of thousands of messages a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

import zmq

from disagg.coordinator.auth import ClientAccess
from disagg.coordinator.core import (
    MAX_PAIR_EPOCHS,
    CoordinatorCore,
    CoordinatorSettings,
    NodeObserver,
    Outbox,
)
from disagg.coordinator.core.outbox import client_batch, coalesced, node_batch
from disagg.coordinator.events import RequestEvents
from disagg.coordinator.metrics import CoordinatorMetrics
from disagg.coordinator.nodes import NodeState
from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.errors import ConfigError, ProtocolError, ServerUnavailable
from disagg.protocol import decode_request, encode, error_reply
from disagg.protocol.cluster import decode_from_node, encode_node
from disagg.protocol.curve import configure_curve_server
from disagg.protocol.sockets import POLLIN, events, recv_frames, send_frames

__all__ = ["MAX_PAIR_EPOCHS", "Coordinator", "CoordinatorSettings"]

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(
        self,
        model_dir: str,
        settings: CoordinatorSettings | None = None,
        *,
        access: ClientAccess | None = None,
        metrics: CoordinatorMetrics | None = None,
    ):
        s = settings or CoordinatorSettings()
        try:
            events = RequestEvents(log_path=s.events_log)
        except OSError as e:
            raise ConfigError("events_log", f"cannot append to {s.events_log}: {e.strerror}") from e
        self.core = CoordinatorCore(
            ModelConfig.from_dir(model_dir),
            Tokenizer.from_dir(model_dir),
            s,
            access=access,
            metrics=metrics,
            events=events,
            now=time.monotonic(),
        )
        self.ctx = zmq.Context()
        self.clients = self.ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.node_socket = self.ctx.socket(zmq.ROUTER)
        self.node_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.node_socket.setsockopt(zmq.LINGER, 0)
        # No send high-water mark: at the default (1,000 messages a peer) a ROUTER drops
        # what a slow peer has not read yet, silently: a lost task or a lost Finished.
        # What waits is bounded by the requests in flight (each message is about one).
        for sock in (self.clients, self.node_socket):
            sock.setsockopt(zmq.SNDHWM, 0)
        if s.curve_secret_key is not None:
            configure_curve_server(self.clients, s.curve_secret_key)
            configure_curve_server(self.node_socket, s.curve_secret_key)
        self._tasks: list[asyncio.Task[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._pending = Outbox()  # decided, sent when this turn of the event loop ends
        self._flush_scheduled = False
        # Messages through each socket, either way (a batch counts once): what the
        # control plane's cost scales with (bench/control_plane.py reports them).
        self.message_counts = {"client_in": 0, "client_out": 0, "node_in": 0, "node_out": 0}

    # -- what others read of the core ---------------------------------------------------

    @property
    def settings(self) -> CoordinatorSettings:
        return self.core.settings

    @property
    def requests(self):
        return self.core.requests

    @property
    def nodes(self) -> dict[str, NodeState]:
        return self.core.nodes

    @property
    def pools(self):
        return self.core.pools

    @property
    def ttft_predictor(self):
        return self.core.ttft_predictor

    @property
    def events(self) -> RequestEvents:
        return self.core.events

    @property
    def metrics(self) -> CoordinatorMetrics | None:
        return self.core.metrics

    @property
    def finished_log(self):
        return self.core.finished_log

    @property
    def pair_epochs(self) -> dict[tuple[str, str], int]:
        return self.core.pair_epochs

    def live_nodes(self, role: str | None = None) -> list[NodeState]:
        return self.core.live_nodes(role)

    def add_node_observer(self, observer: NodeObserver) -> None:
        """``observer(node, message, now)`` sees every message from a live node before
        the core handles it (call on the loop's thread, or before ``run``)."""
        self.core.add_node_observer(observer)

    # -- life cycle ------------------------------------------------------------------

    def bind(self) -> tuple[str, str]:
        """Binds both endpoints; returns their actual addresses (port 0 -> ephemeral)."""
        self.clients.bind(self.settings.client_address)
        self.node_socket.bind(self.settings.node_address)
        return (
            self.clients.getsockopt(zmq.LAST_ENDPOINT).decode(),
            self.node_socket.getsockopt(zmq.LAST_ENDPOINT).decode(),
        )

    async def run(self) -> None:
        # What the process holds before serving (torch, the model's config, the tokenizer:
        # ~200,000 objects) lives as long as it does: kept out of the cyclic collector,
        # whose full collections otherwise scan all of it every few hundred requests (a
        # third of the coordinator's CPU per request at 1,024 in flight, measured).
        # Reference counting still frees what is released; close() undoes it.
        gc.freeze()
        self._loop = asyncio.get_running_loop()
        for sock, handle in self._readers():
            self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, sock, handle)
            self._loop.call_soon(self._drain, sock, handle)  # what came before the reader
        self._tasks = [asyncio.create_task(self._timer_loop())]
        await self._stopped.wait()

    async def wait_for_nodes(
        self, prefill: int, decode: int, timeout: float, *, colocated: int = 0
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                len(self.live_nodes("prefill")) >= prefill
                and len(self.live_nodes("decode")) >= decode
                and len(self.live_nodes("colocated")) >= colocated
            ):
                return
            await asyncio.sleep(0.05)
        raise ServerUnavailable(
            f"only {len(self.live_nodes('prefill'))}/{prefill} prefill, "
            f"{len(self.live_nodes('decode'))}/{decode} decode and "
            f"{len(self.live_nodes('colocated'))}/{colocated} colocated nodes registered "
            f"within {timeout:.0f} s",
            address=self.settings.node_address,
            timeout=timeout,
        )

    async def drain(self, timeout: float) -> int:
        """Stops accepting requests and waits up to ``timeout`` s for those in flight;
        fails what is left with ``unavailable``. Returns how many were failed."""
        self.core.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        failed, out = self.core.fail_all(
            ServerUnavailable("the server shut down", address=""), time.monotonic()
        )
        self._send(out)
        return failed

    async def close(self) -> None:
        self._send(self.core.shutdown_nodes())
        await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._stopped.set()
        if self._loop is not None:
            for sock, _ in self._readers():
                self._loop.remove_reader(sock.getsockopt(zmq.FD))
        gc.unfreeze()
        self.events.close()
        self.clients.close(linger=0)
        self.node_socket.close(linger=0)
        self.ctx.term()

    def node_process_exited(self, node_id: str, pid: int, returncode: int) -> None:
        """Whoever runs node processes saw ``pid`` (running ``node_id``) exit: that node is
        gone now, without waiting for its heartbeats to stop (call on the loop)."""
        self._send(self.core.node_process_exited(node_id, pid, returncode, time.monotonic()))

    # -- sockets ---------------------------------------------------------------------

    def _readers(self) -> tuple[tuple[zmq.Socket, Any], ...]:
        """Each socket with its handler (made when asked: a Coordinator keeping its own
        bound methods would be a reference cycle, and a context collected in a cycle
        cannot find its sockets to close them, so its term() hangs whoever collects)."""
        return (
            (self.clients, self._on_client_frames),
            (self.node_socket, self._on_node_frames),
        )

    # Messages taken from one socket per reader callback before the loop runs its other
    # callbacks (the other socket, the timers): no peer starves the rest.
    _DRAIN_LIMIT = 512

    def _drain(self, sock: zmq.Socket, handle: Any) -> None:
        """Takes what ``sock`` holds. Its file descriptor signals an edge, not a level
        (ZeroMQ's rule), so this reads until the socket says it holds nothing more; a
        send may also take the edge, so every flush checks both sockets again."""
        taken = 0
        while taken < self._DRAIN_LIMIT and events(sock) & POLLIN:
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            taken += 1
            try:
                handle(frames)
            except Exception:  # a bug on one message must not stop the coordinator
                log.exception("coordinator: handling a message")
        if taken == self._DRAIN_LIMIT:
            self._loop.call_soon(self._drain, sock, handle)
        if taken:
            self._schedule_flush()

    async def _timer_loop(self) -> None:
        interval = self.settings.publish_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                self._send(self.core.tick(time.monotonic()))
            except Exception:  # a bug here must not stop the timers
                log.exception("coordinator timer")

    def _on_client_frames(self, frames: list[bytes]) -> None:
        self.message_counts["client_in"] += 1
        if len(frames) < 2:
            return
        identity, body = frames[0], frames[1:]
        try:
            msg = decode_request(body, max_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            self._pending.clients.append((identity, error_reply(e)))
            return
        self._keep(self.core.on_client(identity, msg, time.monotonic()))

    def _on_node_frames(self, frames: list[bytes]) -> None:
        self.message_counts["node_in"] += 1
        if len(frames) < 2:
            return
        identity, body = frames[0], frames[1:]
        try:
            msg = decode_from_node(body)
        except ProtocolError as e:
            log.error("dropped a malformed node message: %s", e)
            return
        self._keep(self.core.on_node(identity, msg, time.monotonic()))

    def _keep(self, out: Outbox) -> None:
        self._pending.extend(out)

    def _send(self, out: Outbox) -> None:
        self._pending.extend(out)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Once per turn of the event loop, after every receive loop that woke in it: the
        # core dispatches once, and each peer gets one message for all of it.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._pending.extend(self.core.dispatch(time.monotonic()))
        out = self._pending.take()
        counts = self.message_counts
        for identity, msg in coalesced(out.nodes, node_batch):
            counts["node_out"] += 1
            try:
                send_frames(self.node_socket, [identity, *encode_node(msg)])
            except zmq.ZMQError as e:  # a node whose pipe is full or gone: drop, go on
                log.warning("message to node %r dropped: %s", identity, e)
        for identity, msg in coalesced(out.client_sends(), client_batch):
            counts["client_out"] += 1
            self._send_client(identity, msg)
        if self._loop is not None:  # a send may have taken its socket's readable edge
            for sock, handle in self._readers():
                sent = out.nodes if sock is self.node_socket else out.clients
                if sent and events(sock) & POLLIN:
                    self._loop.call_soon(self._drain, sock, handle)

    def _send_client(self, identity: bytes, msg: Any) -> None:
        try:
            frames = encode(msg)
        except ProtocolError as e:  # text JSON cannot carry (a lone surrogate): a bug
            log.error("a reply to a client could not be encoded, dropped: %s", e)
            return
        try:
            send_frames(self.clients, [identity, *frames])
        except zmq.ZMQError as e:  # a client whose pipe is full or gone: drop, go on
            log.warning("reply to a client dropped: %s", e)

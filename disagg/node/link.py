"""A node's one connection to the coordinator's node endpoint (a ZeroMQ DEALER)."""

from __future__ import annotations

import logging
import time

import zmq

from disagg.errors import DisaggError, ProtocolError
from disagg.protocol.cluster import (
    CoordinatorToNode,
    Credit,
    NodeBatch,
    Refused,
    Register,
    Welcome,
    _NodeMessage,
    decode_from_coordinator,
    encode_node,
)

log = logging.getLogger(__name__)


class RegistrationError(DisaggError):
    """The coordinator refused this node, or never answered."""


class CoordinatorLink:
    def __init__(self, address: str, node_id: str, server_key: str | None = None):
        self.address = address
        self.node_id = node_id
        self._ctx = zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, node_id.encode())
        self.socket.setsockopt(zmq.LINGER, 1000)
        if server_key is not None:
            from disagg.protocol.curve import configure_curve_client

            configure_curve_client(self.socket, server_key)
        self.socket.connect(address)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self.last_sent = 0.0
        self._early: list[CoordinatorToNode] = []  # work that came with the Welcome

    def register(self, hello: Register, timeout: float = 60.0) -> Welcome:
        """Sends ``hello`` until the coordinator answers (it may start after us)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(hello)
            batch = self.receive(timeout=1.0)
            for i, msg in enumerate(batch):
                if isinstance(msg, Welcome):
                    # A coordinator with work waiting sends it right behind the Welcome.
                    self._early = [m for m in batch[i + 1 :] if not isinstance(m, Welcome)]
                    return msg
                if isinstance(msg, Refused):
                    raise RegistrationError(f"the coordinator refused {self.node_id}: {msg.reason}")
        raise RegistrationError(
            f"no answer from the coordinator at {self.address} within {timeout:.0f} s"
        )

    def watch(self, fd: int) -> None:
        """``receive`` also returns (maybe with no message) when ``fd`` is readable."""
        self._poller.register(fd, zmq.POLLIN)

    def send(self, msg: _NodeMessage) -> None:
        self.socket.send_multipart(encode_node(msg), copy=False)
        self.last_sent = time.monotonic()

    def receive(self, timeout: float) -> list[CoordinatorToNode]:
        """Every message waiting, after waiting up to ``timeout`` s for the first."""
        out, self._early = self._early, []
        if out:
            timeout = 0.0
        if not self._poller.poll(max(0, int(timeout * 1000))):
            return out
        if not self.socket.poll(0):
            return out  # woken by another file descriptor
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                msg = decode_from_coordinator(frames)
            except ProtocolError as e:  # a coordinator bug or a stray peer: log, go on
                log.error("%s: dropped a malformed coordinator message: %s", self.node_id, e)
                continue
            if isinstance(msg, NodeBatch):  # several decided at once: each as if alone
                out.extend(msg.messages)
            else:
                out.append(msg)

    def heartbeat_due(self, interval: float) -> bool:
        return time.monotonic() - self.last_sent >= interval

    def credit(self, **fields: int) -> None:
        self.send(Credit(**fields))

    def close(self) -> None:
        self.socket.close(linger=500)

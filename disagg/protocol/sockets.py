"""Whole messages through a plain ZeroMQ socket without blocking, for both ends of the
wire (the coordinator's ROUTERs, the client's DEALER), read from an event loop's reader
callback on the socket's FD rather than through zmq.asyncio, which costs a future and
several callbacks per message.

The FD signals edges, not levels: a reader takes messages while ``events(sock) &
POLLIN``, and since a send can consume an edge, whoever sends looks at the events again.
pyzmq's flags are enum members, and its ``*_multipart`` helpers combine them per frame
(a Python call each): here they are plain ints."""

from __future__ import annotations

import zmq

POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
_EVENTS, _RCVMORE = int(zmq.EVENTS), int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = _NOBLOCK | int(zmq.SNDMORE)


def events(sock: zmq.Socket) -> int:
    """``POLLIN`` / ``POLLOUT`` as the socket has them now."""
    return sock.get(_EVENTS)


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """One whole message's frames (raises ``zmq.Again`` if none is queued)."""
    frames = [sock.recv(_NOBLOCK)]
    while sock.get(_RCVMORE):
        frames.append(sock.recv(_NOBLOCK))
    return frames


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Queues one message without blocking. Raises ``zmq.Again`` when the pipe is full
    (only at the first frame: ZeroMQ takes a message whole or not at all) or another
    ``zmq.ZMQError``."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _MORE if i < last else _NOBLOCK)

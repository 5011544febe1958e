"""The client library: talk to a coordinator over ZeroMQ (``docs/protocol.md``).

    from disagg.client import Client
    with Client("tcp://127.0.0.1:5555", timeout=30) as client:
        out = client.generate("Hello", client_id="alice", max_tokens=32, temperature=0)
        print(out.text, out.timings.ttft)
        with client.stream("Once upon", client_id="alice") as s:
            for chunk in s:
                print(chunk.text, end="")

:class:`AsyncClient` is the same on asyncio (and uvloop); :class:`Client` is safe to
share between threads. Errors: :class:`InvalidRequest` (bad argument, found before
sending or by the coordinator), :class:`RequestRejected`, :class:`ServerUnavailable`,
:class:`RequestFailed`.
"""

from __future__ import annotations

from disagg.client.async_client import DEFAULT_CLIENT_MAX_MESSAGE_BYTES, AsyncClient
from disagg.client.async_stream import AsyncStream
from disagg.client.results import Completion, Nodes, StreamChunk, Timings
from disagg.client.sync_client import Client, Stream
from disagg.errors import InvalidRequest, RequestFailed, RequestRejected, ServerUnavailable

__all__ = [
    "DEFAULT_CLIENT_MAX_MESSAGE_BYTES",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "Completion",
    "InvalidRequest",
    "Nodes",
    "RequestFailed",
    "RequestRejected",
    "ServerUnavailable",
    "Stream",
    "StreamChunk",
    "Timings",
]

"""The wire protocol between clients and the coordinator's client endpoint.

Clients use a ZeroMQ DEALER, the coordinator a ROUTER. Each message is three frames,
``[b"disagg", b"3", JSON payload]``; ``docs/protocol.md`` is the full specification, written
so that a client in another language can be built from it.

    frames = encode(Tokens(request_ids=["r1"], indices=[0], token_ids=[42], texts=[" hi"]))
    msg = decode_reply(frames)          # raises ProtocolError (with .code), nothing else
"""

from __future__ import annotations

from disagg.errors import ProtocolError
from disagg.protocol.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAGIC,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    ProtocolErrorCode,
    decode,
    decode_reply,
    decode_request,
    encode,
)
from disagg.protocol.messages import (
    Abort,
    Accepted,
    Batch,
    ClientMessage,
    Error,
    ErrorCode,
    Finished,
    FinishReason,
    Generate,
    Message,
    Nodes,
    Ping,
    Pong,
    Sampling,
    ServerMessage,
    Timings,
    Tokens,
)
from disagg.protocol.replies import error_from_exception, error_reply

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Abort",
    "Accepted",
    "Batch",
    "ClientMessage",
    "Error",
    "ErrorCode",
    "FinishReason",
    "Finished",
    "Generate",
    "Message",
    "Nodes",
    "Ping",
    "Pong",
    "ProtocolError",
    "ProtocolErrorCode",
    "Sampling",
    "ServerMessage",
    "Timings",
    "Tokens",
    "decode",
    "decode_reply",
    "decode_request",
    "encode",
    "error_from_exception",
    "error_reply",
]

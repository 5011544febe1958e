"""Building ``Error`` replies on the coordinator side.

Every failure the coordinator can meet maps to one ``Error`` code; the client maps each
code back to one exception type (``disagg.client``), so both ends agree on meaning.
"""

from __future__ import annotations

from disagg.errors import (
    InvalidRequestError,
    ProtocolError,
    RequestRejectedError,
    ServerUnavailable,
)
from disagg.protocol.messages import Error


def error_reply(exc: ProtocolError, request_id: str | None = None) -> Error:
    """The reply to a message that :func:`~disagg.protocol.decode` refused: ``bad_message``
    with the protocol error code as ``reason`` (for an unsupported version the message
    names the supported ones). ``request_id`` defaults to the one the decoder could still
    read from the bad message, if any."""
    return Error(
        request_id=request_id if request_id is not None else exc.request_id,
        code="bad_message",
        field=exc.field,
        reason=exc.code,
        message=exc.message,
    )


def error_from_exception(request_id: str | None, exc: Exception) -> Error:
    """The reply for a request that ended in ``exc``: ``invalid_request`` (with the field),
    ``rejected`` (with the reason), ``unavailable``, ``bad_message`` or, for anything
    else, ``failed``."""
    if isinstance(exc, ProtocolError):
        return error_reply(exc, request_id)
    if isinstance(exc, InvalidRequestError):
        return Error(
            request_id=request_id,
            code="invalid_request",
            field=exc.field,
            reason=exc.reason,
            message=str(exc),
        )
    if isinstance(exc, RequestRejectedError):
        return Error(
            request_id=request_id,
            code="rejected",
            reason=exc.reason,
            message=getattr(exc, "message", str(exc)),
        )
    if isinstance(exc, ServerUnavailable):
        return Error(request_id=request_id, code="unavailable", message=str(exc))
    return Error(
        request_id=request_id,
        code="failed",
        message=str(exc) or type(exc).__name__,
    )

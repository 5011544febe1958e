"""Frames <-> messages.

A message is three ZeroMQ frames: ``[MAGIC, version, JSON payload]`` (a ROUTER sees the
peer's identity frame in front; strip it before :func:`decode`, add it after
:func:`encode`). The payload is standard JSON in UTF-8, written and parsed by
pydantic-core: about three times faster than the stdlib ``json`` module on the hot path
(``Tokens``), and just as readable by any other language.

:func:`decode` never raises anything but :class:`~disagg.errors.ProtocolError`; its
``code`` says which check failed, in the order they run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from disagg.errors import ProtocolError
from disagg.protocol.messages import MAX_ID_CHARS, ClientMessage, Message, ServerMessage

MAGIC = b"disagg"
# Version 2 added ``batch`` (one message per connection for what was decided at once);
# version 3 made ``tokens`` columns (one message for many requests' tokens).
PROTOCOL_VERSION = b"3"
SUPPORTED_VERSIONS: tuple[bytes, ...] = (PROTOCOL_VERSION,)
# What a coordinator accepts from one client message by default: room for a prompt of
# ~150k token ids (about 7 bytes each as JSON), small enough that no peer makes it parse
# gigabytes. A deployment with longer contexts raises it.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

ProtocolErrorCode = Literal[
    "bad_frames",
    "wrong_magic",
    "unsupported_version",
    "oversized",
    "not_json",
    "unknown_type",
    "invalid_fields",
]
Expect = Literal["request", "reply", "any"]

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "request": TypeAdapter(Annotated[ClientMessage, Field(discriminator="type")]),
    "reply": TypeAdapter(Annotated[ServerMessage, Field(discriminator="type")]),
    "any": TypeAdapter(Annotated[Message, Field(discriminator="type")]),
}
_PEEK_BYTES = 4096
_REQUEST_ID_RE = re.compile(rb'"request_id"\s*:\s*"([^"\\]{1,%d})"' % MAX_ID_CHARS)


def supported_versions_text() -> str:
    return ", ".join(v.decode() for v in SUPPORTED_VERSIONS)


def encode(msg: Message) -> list[bytes]:
    """The frames for ``msg``. Raises :class:`ProtocolError` (``invalid_fields``) only for
    text that is not valid Unicode (a lone surrogate), which JSON in UTF-8 cannot carry."""
    try:
        payload = msg.__pydantic_serializer__.to_json(msg)
    except PydanticSerializationError as e:
        raise ProtocolError(
            "invalid_fields",
            f"cannot encode {msg.type}: {e}",
            request_id=getattr(msg, "request_id", None),
        ) from None
    return [MAGIC, PROTOCOL_VERSION, payload]


def decode(
    frames: Sequence[bytes],
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    expect: Expect = "any",
) -> Message:
    """The message in ``frames`` (identity frame already removed).

    ``expect`` narrows the accepted types: ``"request"`` (generate, abort, ping) on the
    coordinator, ``"reply"`` (accepted, tokens, finished, error, pong, batch) on a client; a
    message of the other direction is then an ``unknown_type``. Payloads over
    ``max_bytes`` are refused before they are parsed.
    """
    if len(frames) != 3:
        raise ProtocolError(
            "bad_frames",
            f"expected 3 frames (magic, version, JSON payload), got {len(frames)}",
        )
    magic, version, payload = frames
    if magic != MAGIC:
        raise ProtocolError(
            "wrong_magic", f"first frame must be {MAGIC!r}, got {_preview(bytes(magic))}"
        )
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"unsupported protocol version {_version_text(bytes(version))}; "
            f"supported versions: {supported_versions_text()}",
            field="version",
            request_id=_request_id_of(payload, max_bytes),
        )
    if len(payload) > max_bytes:
        raise ProtocolError(
            "oversized",
            f"payload is {len(payload)} bytes, over the limit of {max_bytes} bytes",
            request_id=_request_id_of(payload, max_bytes),
        )
    try:
        return _ADAPTERS[expect].validate_json(payload, strict=True)
    except ValidationError as e:
        raise _from_validation_error(e, payload, expect) from None


def decode_request(
    frames: Sequence[bytes], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> ClientMessage:
    """:func:`decode` for the coordinator: only client -> coordinator messages."""
    return decode(frames, max_bytes=max_bytes, expect="request")


def decode_reply(
    frames: Sequence[bytes], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> ServerMessage:
    """:func:`decode` for a client: only coordinator -> client messages."""
    return decode(frames, max_bytes=max_bytes, expect="reply")


def _from_validation_error(e: ValidationError, payload: bytes, expect: Expect) -> ProtocolError:
    errors = e.errors(include_url=False)
    first = errors[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return ProtocolError("not_json", f"payload is not UTF-8 JSON: {first['msg']}")
    request_id = _request_id_of(payload, len(payload))
    if not loc and kind in ("dict_type", "model_type"):
        return ProtocolError("not_json", "payload must be a JSON object", request_id=request_id)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        expected = first.get("ctx", {}).get("expected_tags", "")
        if kind == "union_tag_not_found":
            what = "the payload has no string field 'type'"
        else:
            what = f"unknown message type {first['ctx']['tag']!r}"
        return ProtocolError(
            "unknown_type",
            f"{what}; expected one of {expected} ({expect} messages)",
            field="type",
            request_id=request_id,
        )
    # loc[0] is the message type (the discriminator's tag); the rest is the field path.
    msg_type, path = loc[0], ".".join(str(p) for p in loc[1:])
    detail = first["msg"].removeprefix("Value error, ")
    if kind not in ("missing", "extra_forbidden", "value_error") and "input" in first:
        detail += f", got {_preview(first['input'])}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ProtocolError(
        "invalid_fields",
        f"{msg_type}.{path}: {detail}{more}",
        field=path,
        request_id=request_id,
        request_ids=_request_ids_of(payload) if msg_type == "tokens" else (),
    )


def _request_id_of(payload: bytes, max_bytes: int) -> str | None:
    """The payload's request id, best effort, so an error reply can name its request.
    Payloads over the limit are not parsed: only their head is searched."""
    if len(payload) > max_bytes:
        found = _REQUEST_ID_RE.search(bytes(payload[:_PEEK_BYTES]))
        return found.group(1).decode("utf-8", "replace") if found else None
    try:
        obj = json.loads(payload)
    except ValueError:  # not JSON, or not UTF-8: there is no request id to read
        return None
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None


def _request_ids_of(payload: bytes) -> tuple[str, ...]:
    """The request ids a ``tokens`` payload names, best effort, so the requests whose
    tokens could not be read can be failed rather than left waiting."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return ()
    ids = obj.get("request_ids") if isinstance(obj, dict) else None
    if not isinstance(ids, list):
        return ()
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS))


def _version_text(version: bytes) -> str:
    text = version.decode("ascii", "replace")
    return repr(text) if text.isprintable() and len(text) <= 16 else _preview(version)


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Checking a request before it leaves, and turning an ``Error`` reply into an exception.

Both ends of the protocol agree on one exception per ``Error`` code:

=================== ============================================
``invalid_request`` :class:`~disagg.errors.InvalidRequest`
``rejected``        :class:`~disagg.errors.RequestRejected`
``unavailable``     :class:`~disagg.errors.ServerUnavailable`
``failed``          :class:`~disagg.errors.RequestFailed`
``bad_message``     :class:`~disagg.errors.RequestFailed`
=================== ============================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from disagg.errors import (
    DisaggError,
    InvalidRequest,
    InvalidRequestError,
    RequestFailed,
    RequestRejected,
    ServerUnavailable,
)
from disagg.protocol import Error
from disagg.protocol.messages import MAX_ID_CHARS
from disagg.sampling_params import SamplingParams

_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True, slots=True)
class Request:
    """A request that passed the local checks; ``timeout`` is ``None`` for no limit."""

    prompt: str | list[int]
    client_id: str
    params: SamplingParams
    timeout: float | None


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """Seconds > 0; ``math.inf`` means no limit (returned as ``None``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidRequest(name, f"must be a number of seconds > 0, got {value!r}")
    return None if math.isinf(value) else float(value)


def prepare_request(
    prompt: Any,
    client_id: Any,
    timeout: Any,
    sampling: dict[str, Any],
    default_timeout: float | None,
) -> Request:
    """Raises :class:`InvalidRequest` naming the argument at fault; nothing is sent then."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt", "is empty")
    elif isinstance(prompt, list | tuple):
        if not prompt:
            raise InvalidRequest("prompt", "is an empty list of token ids")
        for i, t in enumerate(prompt):
            if type(t) is not int or t < 0:
                raise InvalidRequest(
                    "prompt", f"token id at position {i} must be an integer >= 0, got {t!r}"
                )
        prompt = list(prompt)
    else:
        raise InvalidRequest(
            "prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}"
        )
    if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_ID_CHARS:
        raise InvalidRequest(
            "client_id", f"must be a non-empty string of at most {MAX_ID_CHARS} characters"
        )
    for name in sampling:
        if name not in _SAMPLING_FIELDS:
            raise InvalidRequest(
                name, f"is not a sampling parameter; they are: {', '.join(_SAMPLING_FIELDS)}"
            )
    try:
        params = SamplingParams(**sampling)
    except InvalidRequestError as e:
        raise InvalidRequest(e.field, e.reason) from None
    limit = default_timeout if timeout is None else check_timeout(timeout)
    return Request(prompt=prompt, client_id=client_id, params=params, timeout=limit)


def exception_for(err: Error, address: str) -> DisaggError:
    """The exception an ``Error`` reply stands for."""
    rid = err.request_id
    if err.code == "invalid_request":
        return InvalidRequest(err.field or "request", err.reason or err.message)
    if err.code == "rejected":
        return RequestRejected(err.reason or "rejected", err.message)
    if err.code == "unavailable":
        return ServerUnavailable(
            f"the coordinator at {address} cannot serve requests now: {err.message}",
            address=address,
        )
    if err.code == "bad_message":
        return RequestFailed(
            f"the coordinator at {address} could not read request {rid} "
            f"({err.reason}): {err.message}",
            request_id=rid,
        )
    return RequestFailed(f"request {rid} failed: {err.message}", request_id=rid)

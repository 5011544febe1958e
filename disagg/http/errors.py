"""Every failure as OpenAI's error body, ``{"error": {"message", "type", "param",
"code"}}``, with the HTTP status a client of OpenAI's API expects.

The coordinator's typed errors (what ``AsyncClient`` raises) map to one status each:

=================================== ====== ============================================
``InvalidRequest``                  400    ``param`` names the field
``RequestRejected`` unauthorized    401
rate_limit, queue_full              429    this client's rate or queue limit
prompt_too_long, max_tokens_limit   400    this client's size limits (``param`` named)
slo                                 503    predicted TTFT over the SLO: overloaded
``ServerUnavailable``               503    no node can serve, or shutting down
``RequestFailed``                   500    a failure on the server side
=================================== ====== ============================================
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from disagg.errors import (
    DisaggError,
    InvalidRequestError,
    RequestFailed,
    RequestRejectedError,
    ServerUnavailable,
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
# A rejection that is about one field of the request names it.
_REJECTED = {
    "unauthorized": (401, None),
    "rate_limit": (429, None),
    "queue_full": (429, None),
    "prompt_too_long": (400, "prompt"),
    "max_tokens_limit": (400, "max_tokens"),
    "slo": (503, None),
}


class APIError(Exception):
    """An error to answer with; ``param`` is the request field at fault, if one is."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()), status_code=self.status, media_type="application/json"
        )


def from_disagg(exc: DisaggError, rename: dict[str, str] | None = None) -> APIError:
    """The answer to an error the client library raised. ``rename`` maps our field names
    to the request's (``prompt`` -> ``messages`` for chat, ``client_id`` -> ``user``)."""
    rename = rename or {}
    if isinstance(exc, InvalidRequestError):
        field = exc.field.removeprefix("sampling.")
        param = rename.get(field, field)
        return APIError(400, f"{param}: {exc.reason}", param=param, code="invalid_value")
    if isinstance(exc, RequestRejectedError):
        status, field = _REJECTED.get(exc.reason, (429, None))
        param = rename.get(field, field) if field else None
        message = getattr(exc, "message", str(exc))
        return APIError(status, message, param=param, code=exc.reason)
    if isinstance(exc, ServerUnavailable):
        return APIError(503, str(exc), code="unavailable")
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), code="failed")
    return APIError(500, f"{type(exc).__name__}: {exc}", code="failed")


def from_validation(exc: ValidationError) -> APIError:
    """A body that does not fit the schema: 400 naming the first field at fault."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first['msg']}", code="invalid_json")
    if not loc:  # the body as a whole (e.g. a JSON array instead of an object)
        return APIError(400, f"the body must be a JSON object: {first['msg']}", code="invalid_type")
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:3])
    # OpenAI names the top-level field (stream_options, not stream_options.include_usage).
    return APIError(400, detail, param=loc[0], code="invalid_value")

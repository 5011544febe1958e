"""Typed errors for everything a user can get wrong.

Every error a user can cause derives from :class:`DisaggError`, and its message says
what to change: the field, the file, or the allowed values.
"""

from __future__ import annotations


class DisaggError(Exception):
    """Base class of every error this project raises on purpose."""


class CheckpointError(DisaggError):
    """A model directory is missing a file, or a file in it is unreadable or inconsistent."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnsupportedArchitectureError(DisaggError):
    """The checkpoint's architecture is not one the engine implements."""

    def __init__(self, architecture: str, supported: list[str]) -> None:
        super().__init__(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(supported))}"
        )
        self.architecture = architecture
        self.supported = supported


class UnsupportedQuantizationError(CheckpointError):
    """A GGUF tensor is stored in a quantisation type the loader does not dequantize."""

    def __init__(self, path: str, tensor: str, quant_type: str, supported: list[str]) -> None:
        super().__init__(
            path,
            f"tensor {tensor!r} is quantised as {quant_type}, which is not supported; "
            f"supported: {', '.join(supported)}",
        )
        self.tensor = tensor
        self.quant_type = quant_type
        self.supported = supported


class ModelNotInstalledError(DisaggError):
    """A model named by its registry name whose package is not installed."""

    def __init__(self, model: str, install_command: str) -> None:
        super().__init__(f"model {model!r} is not installed; install it with: {install_command}")
        self.model = model
        self.install_command = install_command


class InvalidRequestError(DisaggError, ValueError):
    """A request (prompt or sampling parameters) is invalid; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ConfigError(DisaggError, ValueError):
    """An engine or deployment setting is invalid; ``field`` names the setting."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class RequestRejectedError(DisaggError):
    """A valid request the server will not take now; ``reason`` says why
    (``rate_limit``, ``queue_full``, ``slo``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# -- the wire protocol and the client library ------------------------------------------


class ProtocolError(DisaggError):
    """A ZeroMQ message is not a valid protocol message.

    ``code`` names the check that failed (``bad_frames``, ``wrong_magic``,
    ``unsupported_version``, ``oversized``, ``not_json``, ``unknown_type``,
    ``invalid_fields``); ``field`` is the dotted path of the offending field when there is
    one; ``request_id`` is the message's request id when it could still be read, so the
    reply can name the request it is about; ``request_ids`` those of a message about
    several (``tokens``), when they could be read.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        request_id: str | None = None,
        request_ids: tuple[str, ...] = (),
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id
        self.request_ids = request_ids


# The client library's names for the same two concepts (one class each, so a server-side
# check and the client's raise, and catch, the same type).
#: The client's request is invalid: found locally before sending, or reported by the
#: coordinator (``invalid_request``). ``field`` names the argument to change.
InvalidRequest = InvalidRequestError
#: The coordinator will not take this valid request now (``rejected``); ``reason`` is
#: machine-readable (``rate_limit``, ``queue_full``, ...), ``message`` is for people.
RequestRejected = RequestRejectedError


class ServerUnavailable(DisaggError):
    """No coordinator answered: nothing was heard within the timeout (ZeroMQ connects
    lazily, so an absent server shows only as silence), or the coordinator said it cannot
    serve (``unavailable``). ``address`` and ``timeout`` say where and how long we waited."""

    def __init__(self, message: str, *, address: str, timeout: float | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.timeout = timeout


class RequestFailed(DisaggError):
    """A request that may have started did not finish: the coordinator reported a failure,
    sent a reply the client could not read, stalled past the timeout, or the client was
    closed while the request was in flight."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class AuthenticationError(RequestRejectedError):
    """The coordinator checks API keys and this request's key is missing or unknown.

    ``reason`` is ``unauthorized`` (the reason docs/protocol.md lists for a ``rejected``
    error); the message never repeats the key."""

    def __init__(self, message: str) -> None:
        super().__init__("unauthorized", message)


class RankFailedError(DisaggError):
    """A rank process of a tensor/pipeline-parallel group died or raised; the group is
    stopped and unusable. ``rank`` is the failed rank (global index), ``reason`` what
    happened to it (its exception, or how the process ended)."""

    def __init__(self, rank: int, reason: str) -> None:
        super().__init__(f"rank {rank} failed: {reason}")
        self.rank = rank
        self.reason = reason

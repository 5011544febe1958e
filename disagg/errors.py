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

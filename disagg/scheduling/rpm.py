"""Requests-per-minute limiting: first come, first served, with each client's arrivals
capped per sliding 60-second window. A request over the cap is rejected on arrival."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from disagg.errors import ConfigError, RequestRejectedError
from disagg.scheduling.fcfs import FCFS
from disagg.scheduling.policy import Request

WINDOW_S = 60.0


class RPM(FCFS):
    """At most ``limit`` (or ``limits[client]``) accepted requests per client in any
    window ``(t - 60 s, t]``; the next one raises :class:`RequestRejectedError` and is
    not queued. Requeued (preempted) requests are not counted again."""

    def __init__(self, limit: int, limits: Mapping[str, int] | None = None):
        super().__init__()
        for name, value in [
            ("rpm_limit", limit),
            *((f"rpm_limits.{c}", v) for c, v in (limits or {}).items()),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        self.limit = limit
        self.limits = dict(limits or {})
        self._accepted: dict[str, deque[float]] = {}

    def add(self, request: Request) -> None:
        now = request.arrival_time
        times = self._accepted.setdefault(request.client_id, deque())
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        cap = self.limits.get(request.client_id, self.limit)
        if len(times) >= cap:
            raise RequestRejectedError(
                "rate_limit",
                f"client {request.client_id!r} is over its limit of {cap} requests per minute",
            )
        times.append(now)
        super().add(request)

    def requeue(self, request: Request) -> None:
        super().add(request)

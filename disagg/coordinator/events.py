"""Per-request lifetime events, for latency breakdowns (as DistServe keeps them).

``RequestEvents`` keeps the events of the last ``capacity`` requests: recording is an
append (and, past the capacity, dropping the oldest request). ``breakdown`` turns one
request's events into phase durations; ``dump_jsonl`` writes them all for offline study,
and with ``log_path`` each request is appended to that file as one JSON line when it
finishes or fails (``disagg serve --events-log``), so a running server's breakdowns can
be read while it serves.

Times are ``clock()`` seconds (monotonic by default): comparable within one process
only. Each dumped request also carries the wall-clock time of its first event.
Not thread-safe: call from the coordinator's event loop.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

#: Every event name, in the order a request normally meets them. A request that is
#: re-dispatched after a node failure meets the middle ones again.
EVENTS = (
    "arrived",
    "dispatched",
    "prefill_start",
    "prefill_end",
    "transfer_start",
    "transfer_end",
    "decode_start",
    "decode_end",
    "finished",
    "failed",
)
_EVENT_SET = frozenset(EVENTS)
_TERMINAL = ("finished", "failed")
_PHASES = ("prefill", "transfer", "decode")


@dataclass(slots=True)
class RequestRecord:
    """One request's events as ``(name, time, node_id)`` in the order recorded.
    ``rid`` is the coordinator's own id (unique while it runs);
    ``request_id`` the id the client chose (``Completion.request_id``; unique per
    connection only)."""

    rid: str
    client_id: str | None
    request_id: str | None = None
    events: list[tuple[str, float, str | None]] = field(default_factory=list)

    def first(self, name: str) -> float | None:
        for event, t, _ in self.events:
            if event == name:
                return t
        return None


class RequestEvents:
    """A bounded log of request lifetime events."""

    def __init__(
        self,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        *,
        log_path: str | Path | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._clock = clock
        # Offset from ``clock`` to the Unix epoch, taken once, for the dump.
        self._wall_offset = time.time() - clock()
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()
        # Line-buffered: a request's line is in the file once its last event is recorded.
        self._log: TextIO | None = (
            Path(log_path).open("a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed by close())
            if log_path
            else None
        )

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def record(
        self,
        rid: str,
        event: str,
        *,
        client_id: str | None = None,
        request_id: str | None = None,
        node_id: str | None = None,
        t: float | None = None,
    ) -> None:
        """Append ``event`` for ``rid`` at time ``t`` (now by default). The first
        event of a request (normally ``arrived``, with its ``client_id`` and the client's
        own ``request_id``) opens its record, evicting the oldest request when
        full."""
        if event not in _EVENT_SET:
            raise ValueError(f"unknown request event {event!r}; known: {', '.join(EVENTS)}")
        rec = self._records.get(rid)
        if rec is None:
            rec = self._records[rid] = RequestRecord(rid, client_id, request_id)
            if len(self._records) > self.capacity:
                self._records.popitem(last=False)
        elif client_id is not None or request_id is not None:
            rec.client_id = rec.client_id or client_id
            rec.request_id = rec.request_id or request_id
        rec.events.append((event, self._clock() if t is None else t, node_id))
        if self._log is not None and event in _TERMINAL:
            self._log.write(json.dumps(self._line(rec)) + "\n")

    def get(self, rid: str) -> RequestRecord | None:
        return self._records.get(rid)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, rid: object) -> bool:
        return rid in self._records

    def breakdown(self, rid: str) -> dict[str, float]:
        """Seconds spent in each part of the request's life. Keys appear only when their
        events were recorded:

        - ``queue``: arrival to the first ``prefill_start``;
        - ``prefill``, ``transfer``, ``decode``: summed over each start/end pair of that
          phase, so attempts cut short by a node failure and then redone all count, and
          a start with no end (the node died) counts nothing;
        - ``decode_queue``: the first ``prefill_end`` to the first ``transfer_start`` (the
          KV waiting on the prefill node for a decode node to pull it);
        - ``total``: arrival to ``finished`` or ``failed``.

        Raises ``KeyError`` for a request not (or no longer) in the log."""
        rec = self._records[rid]
        out: dict[str, float] = {}
        arrived = rec.first("arrived")
        first_prefill = rec.first("prefill_start")
        if arrived is not None and first_prefill is not None:
            out["queue"] = first_prefill - arrived
        for phase in _PHASES:
            spent = _paired_time(rec.events, f"{phase}_start", f"{phase}_end")
            if spent is not None:
                out[phase] = spent
        prefill_end, pull = rec.first("prefill_end"), rec.first("transfer_start")
        if prefill_end is not None and pull is not None and pull >= prefill_end:
            out["decode_queue"] = pull - prefill_end
        end = next((t for name, t, _ in reversed(rec.events) if name in _TERMINAL), None)
        if arrived is not None and end is not None:
            out["total"] = end - arrived
        return out

    def dump_jsonl(self, path: str | Path) -> int:
        """Write one JSON object per request, oldest first: ``rid``, ``client_id``,
        ``request_id``, ``unix_time`` (of its first event), ``events`` (``[{"event", "t", "node_id"}]``)
        and ``breakdown``. Returns the number of requests written."""
        with Path(path).open("w", encoding="utf-8") as f:
            for rec in self._records.values():
                f.write(json.dumps(self._line(rec)) + "\n")
        return len(self._records)

    def _line(self, rec: RequestRecord) -> dict:
        return {
            "rid": rec.rid,
            "client_id": rec.client_id,
            "request_id": rec.request_id,
            "unix_time": rec.events[0][1] + self._wall_offset,
            "events": [{"event": e, "t": t, "node_id": n} for e, t, n in rec.events],
            "breakdown": self.breakdown(rec.rid),
        }


def _paired_time(events: list[tuple[str, float, str | None]], start: str, end: str) -> float | None:
    total, opened, seen = 0.0, None, False
    for name, t, _ in events:
        if name == start:
            opened = t  # a second start without an end: the earlier attempt was cut short
        elif name == end and opened is not None:
            total += t - opened
            opened, seen = None, True
    return total if seen else None

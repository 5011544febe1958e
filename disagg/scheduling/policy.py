"""The contract every scheduling policy meets.

A policy owns the waiting queue's order and chooses preemption victims; the scheduler
owns memory and batching. Policies see requests only through the attributes they read
(``seq_id``, ``arrival_time``, ``client_id``, token counts), so the same objects can
drive the colocated engine, the prefill and decode nodes, and the simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from collections.abc import Sequence as SeqList
from typing import Protocol


class Request(Protocol):
    seq_id: int
    arrival_time: float
    client_id: str

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def num_output_tokens(self) -> int: ...


class SchedulingPolicy(ABC):
    """Orders waiting requests and picks which running request to preempt.

    Contract: ``add`` takes a request that arrives (it may raise
    :class:`RequestRejectedError`, and then the request is not queued); ``requeue``
    takes one returning after preemption. ``peek``/``pop`` give the request to admit
    next (``peek`` is None when empty); a request not admitted stays queued, in place.
    ``preemption_victim`` names the running request to evict when memory runs out.
    ``on_admitted`` / ``on_tokens`` report service, for policies that charge for it, and
    ``on_finished`` that a request is done (finished or aborted) wherever it was. Each
    operation is O(log n).
    """

    @abstractmethod
    def add(self, request: Request) -> None: ...

    def requeue(self, request: Request) -> None:
        """A preempted request returns to the queue."""
        self.add(request)

    @abstractmethod
    def peek(self) -> Request | None: ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def remove(self, request: Request) -> bool:
        """Drops a waiting request (e.g. aborted); False if it was not waiting."""

    @abstractmethod
    def preemption_victim(self, running: SeqList[Request]) -> Request: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def on_admitted(self, request: Request, num_input_tokens: int) -> None:  # noqa: B027
        """The request's prompt was admitted to a batch (input service)."""

    def on_tokens(self, request: Request, num_output_tokens: int) -> None:  # noqa: B027
        """The request produced output tokens (output service); the request's
        ``num_output_tokens`` already counts them."""

    def on_tokens_of(self, counts: Mapping[Request, int]) -> None:
        """:meth:`on_tokens` for several requests at once (a decode step's): ``counts``
        maps each request to the tokens it produced, already counted in its
        ``num_output_tokens``. A policy may charge them summed per client."""
        for request, n in counts.items():
            self.on_tokens(request, n)

    def on_finished(self, request: Request) -> None:  # noqa: B027
        """The request is done, wherever it was (queued, running, between stages)."""

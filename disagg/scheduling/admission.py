"""The admission rule every batcher shares (the engine, both node kinds, the simulator).

Take waiting requests in the queue's order while the head fits; a head that does not fit
blocks the queue, and nothing behind it is taken. That is what VTC's fairness bound rests
on: admission order is the policy's order, so a client whose head is large waits for
memory, but is never overtaken by the small requests of a client served more. Each
caller passes its limits (:class:`Limits`) and how much memory and how many batch tokens
a request brings; the rule itself is written only here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

# Admitting a request beside running ones keeps this share of the KV pool free for
# their growth, so the next decode steps do not preempt the newcomer at once (which
# would waste its prefill). Nothing is kept back for a request that runs alone.
WATERMARK_FRACTION = 0.01


def watermark(capacity: int) -> int:
    """Blocks (or tokens) of ``capacity`` kept free when admitting beside others."""
    return int(capacity * WATERMARK_FRACTION)


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Ordered(Protocol[T_co]):
    """A queue in admission order: every :class:`~disagg.scheduling.SchedulingPolicy`,
    and a node's :class:`~disagg.node.local_queue.CounterQueue`. ``peek`` may change
    after a ``pop`` (a policy's counters move as a request is charged)."""

    def peek(self) -> T_co | None: ...

    def pop(self) -> T_co: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """What one admission round may take. Memory is in the caller's unit (KV blocks for
    the engine and the nodes, tokens for the simulator).

    ``free``: memory free now. ``max_seqs``: sequences the batch may hold, the
    ``running`` ones included. ``running``: sequences already holding memory beside the
    batch. ``token_budget``: tokens one batch may compute; None when admission computes
    nothing (a decode node pulls KV); the first request is always within it, so a prompt
    longer than the budget runs in a batch of its own. ``watermark``: memory kept free
    when a request is admitted beside others (running, or taken earlier this round).
    """

    free: int
    max_seqs: int
    running: int = 0
    token_budget: int | None = None
    watermark: int = 0

    def admits(
        self, need: int, tokens: int = 0, *, taken: int = 0, taken_tokens: int = 0, used: int = 0
    ) -> bool:
        """Whether a request needing ``need`` memory and ``tokens`` batch tokens fits
        after ``taken`` requests (``taken_tokens`` tokens, ``used`` memory) this round."""
        if self.running + taken >= self.max_seqs:
            return False
        if taken and self.token_budget is not None and taken_tokens + tokens > self.token_budget:
            return False
        reserve = self.watermark if self.running or taken else 0
        return need + reserve <= self.free - used


def take_in_order(
    queue: Ordered[T],
    limits: Limits,
    need: Callable[[T], int],
    tokens: Callable[[T], int] | None = None,
    on_take: Callable[[T], None] | None = None,
) -> list[T]:
    """Pops the queue's head while it fits ``limits`` and returns what was taken, in
    order. ``need``: the memory a request brings; ``tokens``: its batch tokens (only
    read under a token budget). ``on_take`` runs on each request as it is popped,
    before the next head is looked at: a policy that charges at admission reorders its
    queue there."""
    assert limits.token_budget is None or tokens is not None, "a token budget needs tokens"
    taken: list[T] = []
    used = 0
    batch_tokens = 0
    while (head := queue.peek()) is not None:
        m = need(head)
        n = tokens(head) if tokens is not None else 0
        if not limits.admits(m, n, taken=len(taken), taken_tokens=batch_tokens, used=used):
            break  # the head that does not fit is not overtaken
        queue.pop()
        taken.append(head)
        used += m
        batch_tokens += n
        if on_take is not None:
            on_take(head)
    return taken


def make_room(
    running: list[T],
    need: Callable[[T], int],
    free: Callable[[], int],
    victim: Callable[[list[T]], T],
    evict: Callable[[T], None],
    grant: Callable[[T, int], None],
) -> tuple[list[T], list[T]]:
    """The other half of the rule: gives each running request, in ``running``'s order,
    the memory its next step needs, evicting the policy's ``victim`` while memory is
    short. The victim is chosen among every request still running, those already
    granted included (running order need not be the policy's order), and may be the
    request being served, which then goes without. ``evict`` frees a victim's memory
    (``free`` then counts it); ``grant`` gives a request the ``need`` it was found to
    have. Returns the requests kept, in order, and those evicted, in eviction order."""
    kept: list[T] = []
    evicted: list[T] = []
    pending = list(running)
    while pending:
        request = pending.pop(0)
        n = need(request)
        while n > free():
            chosen = victim(kept + pending + [request])
            evict(chosen)
            evicted.append(chosen)
            if chosen is request:
                break
            (kept if chosen in kept else pending).remove(chosen)
        else:
            if n > 0:
                grant(request, n)
            kept.append(request)
    return kept, evicted

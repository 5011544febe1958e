"""What a simulated cluster is: its shape and its instances' behaviour per step.

Instances are driven by :class:`disagg.sim.simulator.Simulator`; each plans its next
step from the pool policies (the very objects the real nodes use) and reports what the
step did, except a disaggregated prefill instance, which batches the prompts dispatched
to it (:class:`PrefillQueue`), as a prefill node batches its local queue. Decode runs in *macro-steps*: k identical-batch decode steps at once,
cut wherever something could change the batch (a request finishing, memory running
out, a new request becoming admissible), which is exact for the metrics kept and makes
simulation of long outputs cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from disagg.errors import ConfigError
from disagg.scheduling import LinearCost, SchedulingPolicy
from disagg.scheduling.admission import Limits, Ordered, take_in_order, watermark
from disagg.sim.latency import LatencyModel
from disagg.sim.request import SimRequest


@dataclass(frozen=True)
class ClusterSpec:
    """``colocated``: ``instances`` instances each running prefill and decode,
    prefill first (or, with ``chunked_prefill`` tokens per step, mixed batches).
    ``disagg``: ``prefill`` and ``decode`` instances; KV moves at
    ``transfer_bandwidth`` bytes/s (+ ``transfer_latency`` s) when a decode instance
    pulls a request. ``max_batch_tokens`` caps a prefill batch, ``max_batch_size`` the
    requests decoding at once. ``admission``: ``optimistic`` admits a request when its
    prompt fits (beside a small watermark) and preempts when decode runs out of memory,
    as the engine does; ``reserve`` admits only when prompt + all its output fit, so no
    request is ever preempted (S-LoRA's and the VTC artifact's rule, which knows each
    request's output length). ``publish_interval`` (two-stage VTC) is how often the
    merged counters reach the pools; None means they see them live.

    What a served prefill node adds to its batch times (disaggregated only; measured by
    ``disagg profile --from-served``): ``prefill_gap`` seconds from one batch's end to
    the next one's start (the node's turnaround: results out, next batch in), and
    ``prefill_jitter``, the standard deviation of ln(batch time / modelled time): each
    batch's time is the model's times ``exp(jitter · z)``, z drawn from a standard
    normal by a generator seeded with ``jitter_seed`` (so a run is repeatable)."""

    kind: Literal["colocated", "disagg"] = "colocated"
    instances: int = 1
    prefill: int = 1
    decode: int = 1
    max_batch_tokens: int = 8192
    max_batch_size: int = 256
    chunked_prefill: int | None = None
    transfer_bandwidth: float = 25e9
    transfer_latency: float = 1e-3
    publish_interval: float | None = None
    admission: Literal["optimistic", "reserve"] = "optimistic"
    prefill_gap: float = 0.0
    prefill_jitter: float = 0.0
    jitter_seed: int = 0

    def __post_init__(self) -> None:
        if self.admission not in ("optimistic", "reserve"):
            raise ConfigError("admission", f"must be optimistic or reserve, got {self.admission!r}")
        if self.kind not in ("colocated", "disagg"):
            raise ConfigError("cluster", f"must be colocated or disagg, got {self.kind!r}")
        for name in ("instances", "prefill", "decode", "max_batch_tokens", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if self.chunked_prefill is not None and (
            self.chunked_prefill < 1 or self.kind != "colocated"
        ):
            raise ConfigError(
                "chunked_prefill", "must be >= 1 and applies to a colocated cluster only"
            )
        if not self.transfer_bandwidth > 0:
            raise ConfigError("transfer_bandwidth", f"must be > 0, got {self.transfer_bandwidth!r}")
        if self.publish_interval is not None and not self.publish_interval > 0:
            raise ConfigError("publish_interval", f"must be > 0, got {self.publish_interval!r}")
        for name in ("prefill_gap", "prefill_jitter"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ConfigError(name, f"must be a finite number >= 0, got {value!r}")


@dataclass(slots=True)
class Step:
    """One planned step of an instance: how long it takes and what it did."""

    duration: float
    prefilled: list[SimRequest]  # produce their next token at the end
    decoded: list[SimRequest]  # produce ``tokens`` tokens each at the end
    tokens: int = 0
    preempted: list[SimRequest] | None = None


class Instance:
    """KV memory accounting shared by every kind of instance, in tokens. ``used`` is
    the sum of the footprints of the requests it holds: their context, plus (when the
    instance decodes under ``reserve`` admission) the output they have yet to produce."""

    def __init__(self, index: int, latency: LatencyModel, spec: ClusterSpec, *, decodes: bool):
        self.index = index
        self.latency = latency
        self.spec = spec
        self.capacity = latency.kv_capacity_tokens
        if self.capacity < 1:
            raise ConfigError(
                "kv_capacity_tokens", "the model leaves no room for KV cache on this instance"
            )
        self.reserves_output = decodes and spec.admission == "reserve"
        # The watermark keeps room for running requests' growth; an instance that only
        # prefills (disaggregated) holds KV that does not grow, as a prefill node does.
        self.watermark = watermark(self.capacity) if decodes and not self.reserves_output else 0
        self.used = 0
        self.busy = False

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def footprint(self, r: SimRequest) -> int:
        return r.context + (r.remaining if self.reserves_output else 0)

    def need(self, r: SimRequest, extra: int) -> int:
        """The KV that admitting ``r`` takes, bringing ``extra`` tokens of it: those, and
        the slot of its next token (or, reserving, every output token)."""
        return extra + (r.remaining if self.reserves_output else 1)

    def limits(self, running: int, token_budget: int | None) -> Limits:
        return Limits(
            free=self.free,
            max_seqs=self.spec.max_batch_size,
            running=running,
            token_budget=token_budget,
            watermark=self.watermark,
        )


class PrefillQueue:
    """The prompts dispatched to one disaggregated prefill instance, waiting for its next
    batch, in the order a prefill node takes them (its
    :class:`~disagg.node.local_queue.CounterQueue`): the client's counter as the pool's
    view has it when the batch is formed (``counter``; None orders by arrival only, as
    every counter is 0 under FCFS and RPM), then arrival. ``need`` is the KV they will
    take on admission, which dispatch counts as taken, as a node's credit does."""

    def __init__(self, instance: Instance, counter: Callable[[str], float] | None):
        self._instance = instance
        self._counter = counter
        self._items: list[SimRequest] = []  # after order(): the head last
        self.need = 0

    def add(self, r: SimRequest) -> None:
        self._items.append(r)
        self.need += self._instance.need(r, r.prefill_tokens)

    def order(self) -> None:
        """Sorts for the next batch. A node's order moves with a publication, not with
        what it admits, so it is fixed while one batch is taken."""
        counter = self._counter
        if counter is None:
            self._items.sort(key=lambda r: (r.arrival_time, r.seq_id), reverse=True)
        else:
            self._items.sort(
                key=lambda r: (counter(r.client_id), r.arrival_time, r.seq_id), reverse=True
            )

    def peek(self) -> SimRequest | None:
        return self._items[-1] if self._items else None

    def pop(self) -> SimRequest:
        r = self._items.pop()
        self.need -= self._instance.need(r, r.prefill_tokens)
        return r

    def __len__(self) -> int:
        return len(self._items)


def _prefill_tokens(r: SimRequest) -> int:
    return r.prefill_tokens


def admit_prefill_batch(
    queue: Ordered[SimRequest],
    instance: Instance,
    running: int,
    now: float,
    log: ServiceLog,
    charge: SchedulingPolicy | None,
) -> list[SimRequest]:
    """Takes waiting requests in the queue's order while the head fits (token budget,
    KV memory, batch size); the head blocks the queue when it does not. ``charge``: the
    policy charged a request's input on its first admission (an engine charges as it
    admits), or None when that was done at dispatch (the coordinator charges a
    disaggregated prefill as it dispatches it)."""

    def take(head: SimRequest) -> None:
        # What was checked is what is taken: the prompt (or recompute) and the slot of
        # the token this prefill produces (or, reserving, every output token). Taking
        # only the prompt let a batch of many short prompts overrun the pool at its end.
        instance.used += instance.need(head, head.prefill_tokens)
        first_time = head.num_preemptions == 0 and head.prefill_start is None
        if head.prefill_start is None:
            head.prefill_start = now
        head.instance = instance.index
        if charge is not None:
            charge.on_admitted(head, head.prompt_len if first_time else 0)
        if first_time:
            log.input(now, head)

    def need(r: SimRequest) -> int:
        return instance.need(r, r.prefill_tokens)

    limits = instance.limits(running, instance.spec.max_batch_tokens)
    return take_in_order(queue, limits, need, _prefill_tokens, on_take=take)


def prefill_duration(latency: LatencyModel, batch: list[SimRequest]) -> float:
    lens = [r.prefill_tokens for r in batch]
    return latency.prefill_time(sum(lens), sum(n * n for n in lens), len(batch))


def decode_duration(latency: LatencyModel, batch_size: int, context: int, steps: int) -> float:
    """``steps`` decode steps of a fixed batch whose context grows by ``batch_size``
    per step: the mean of the first and last steps' times, times ``steps`` (exact when
    time is linear in context; the mean context itself may be a half token, which an
    integer midpoint would round away)."""
    first = latency.decode_time(batch_size, context)
    if steps == 1:
        return first
    last = latency.decode_time(batch_size, context + batch_size * (steps - 1))
    return steps * (first + last) / 2


def steps_until(deadline: float, now: float, step_time: float, growth: float = 0.0) -> int:
    """Decode steps that start before ``deadline`` (at least one): the first takes
    ``step_time`` and each next one ``growth`` longer (the batch's context grows every
    step). Counting them all at the first step's time overshot the deadline by up to
    k²·growth/2, so an arrival waited many steps past its own."""
    if math.isinf(deadline):
        return 1 << 30
    span = deadline - now
    first = max(step_time, 1e-12)
    if span <= first:
        return 1
    if growth <= 0:
        return math.ceil(span / first)

    def elapsed(k: int) -> float:  # k steps' time, as decode_duration adds them
        return k * first + growth * k * (k - 1) / 2

    # The smallest k with elapsed(k) >= span: the quadratic's root (in the form that
    # keeps its precision when growth is tiny), then settled exactly.
    b = first - growth / 2
    root = math.sqrt(b * b + 2 * growth * span)
    k = max(1, math.ceil(2 * span / (root + b) if b > 0 else (root - b) / growth))
    while k > 1 and elapsed(k - 1) >= span:
        k -= 1
    while elapsed(k) < span:
        k += 1
    return k


class ServiceLog:
    """Weighted service per client as it is delivered, for the metrics: input at
    admission, output per token, both priced by the metric cost."""

    def __init__(self, cost, weights: dict[str, float]):
        self.cost = cost
        self.weights = weights
        self.events: list[tuple[float, str, float]] = []  # (time, client, weighted service)
        self.backlog: list[tuple[float, str, int]] = []  # (time, client, +1 / -1 pending)
        # Linear cost: output service is w_out per token, whatever came before.
        self._w_out = cost.w_out if isinstance(cost, LinearCost) else None

    def input(self, t: float, r: SimRequest) -> None:
        self.events.append(
            (t, r.client_id, self.cost(r.prompt_len, 0) / self.weights.get(r.client_id, 1.0))
        )

    def output(self, t: float, r: SimRequest, n: int) -> None:
        if self._w_out is not None:
            amount = self._w_out * n
        else:
            amount = self.cost(r.prompt_len, r.produced) - self.cost(r.prompt_len, r.produced - n)
        self.events.append((t, r.client_id, amount / self.weights.get(r.client_id, 1.0)))

    def pending(self, t: float, client: str, delta: int) -> None:
        self.backlog.append((t, client, delta))

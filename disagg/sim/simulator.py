"""The discrete-event loop: arrivals, instance steps, KV transfers and counter
publications, in time order, until the workload's duration. Requests still queued or
running then are reported unfinished (not drained), so every figure describes the
contended window."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from disagg.errors import RequestRejectedError
from disagg.scheduling import (
    CounterOrdered,
    FairnessConfig,
    LinearCost,
    ServiceCost,
    make_policy,
    make_pool_policies,
)
from disagg.scheduling.admission import take_in_order
from disagg.sim.cluster import (
    ClusterSpec,
    Instance,
    PrefillQueue,
    ServiceLog,
    admit_prefill_batch,
    decode_duration,
    prefill_duration,
    steps_until,
)
from disagg.sim.latency import LatencyModel, transfer_time
from disagg.sim.request import SimRequest
from disagg.sim.workload import Workload

INF = float("inf")


@dataclass
class SimResult:
    policy: str
    cluster: ClusterSpec
    duration: float
    requests: list[SimRequest]
    rejected: list[SimRequest]
    log: ServiceLog
    weights: dict[str, float]
    client_ids: list[str]
    metric_cost: ServiceCost = field(default_factory=LinearCost)


class _Node(Instance):
    """An instance plus what it runs: ``running`` decodes; ``incoming`` are pulled
    requests whose KV is still in flight (disaggregated decode only); ``queue`` holds
    the prompts dispatched to it (disaggregated prefill only)."""

    def __init__(self, index: int, latency: LatencyModel, spec: ClusterSpec, *, decodes: bool):
        super().__init__(index, latency, spec, decodes=decodes)
        self.running: list[SimRequest] = []
        self.incoming: list[SimRequest] = []
        self.prefilling: list[list] = []  # chunked prefill: [request, tokens left]
        self.queue: PrefillQueue | None = None
        self.busy_until = 0.0

    def room(self) -> int:
        """KV a prefill instance can still take, its queued prompts counted as taken:
        what the coordinator reads from a prefill node's credit."""
        assert self.queue is not None
        return self.free - self.queue.need


class Simulator:
    def __init__(
        self,
        workload: Workload,
        cluster: ClusterSpec,
        *,
        policy: str,
        latency: LatencyModel,
        decode_latency: LatencyModel | None = None,
        fairness: FairnessConfig | None = None,
        metric_cost: ServiceCost | None = None,
    ):
        self.workload = workload
        self.cluster = cluster
        self.policy_name = policy
        self.now = 0.0
        fairness = fairness or FairnessConfig()
        weights = {**workload.weights, **fairness.weights}
        fairness = replace(
            fairness,
            weights=weights,
            clock=self._clock,
            stale_views=cluster.publish_interval is not None,
        )
        self.weights = weights
        self.log = ServiceLog(metric_cost or fairness.cost, weights)
        # (time, rank, order, action): at one instant, rank-0 events (arrivals, prefill
        # and transfer ends, publications) go before the batch steps that end then, so
        # a step boundary sees everything that became ready at it.
        self._events: list[tuple[float, int, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.requests: list[SimRequest] = []
        self.rejected: list[SimRequest] = []
        self._jitter = random.Random(cluster.jitter_seed)
        if cluster.kind == "colocated":
            self.policy = make_policy(policy, fairness)
            self.pools = None
            self.nodes = [
                _Node(i, latency, cluster, decodes=True) for i in range(cluster.instances)
            ]
            self.prefill_nodes: list[_Node] = []
            self.decode_nodes: list[_Node] = []
        else:
            self.pools = make_pool_policies(policy, fairness)
            self.prefill_nodes = [
                _Node(i, latency, cluster, decodes=False) for i in range(cluster.prefill)
            ]
            dl = decode_latency or latency
            self.decode_nodes = [
                _Node(cluster.prefill + i, dl, cluster, decodes=True) for i in range(cluster.decode)
            ]
            self.nodes = self.prefill_nodes + self.decode_nodes
            prefill = self.pools.prefill
            counter = prefill.view.counter if isinstance(prefill, CounterOrdered) else None
            for node in self.prefill_nodes:
                node.queue = PrefillQueue(node, counter)
        decoding = self.decode_nodes if self.pools is not None else self.nodes
        self._decode_capacity = min(n.capacity for n in decoding)
        self._prefill_capacity = min((n.capacity for n in self.prefill_nodes), default=INF)

    def _clock(self) -> float:
        return self.now

    # -- the loop ------------------------------------------------------------------

    def run(self) -> SimResult:
        arrivals = iter(self.workload.arrivals)
        self._next_arrival = next(arrivals, None)
        self._arrivals = arrivals
        self._schedule_next_arrival()
        if self.pools is not None and self.cluster.publish_interval is not None:
            self._at(self.cluster.publish_interval, self._publish)
        end = self.workload.duration
        while self._events and self._events[0][0] <= end:
            t, _, _, action = heapq.heappop(self._events)
            self.now = t
            action()
        self.now = end
        return SimResult(
            self.policy_name,
            self.cluster,
            end,
            self.requests,
            self.rejected,
            self.log,
            self.weights,
            self.workload.client_ids,
            self.log.cost,
        )

    def _at(self, t: float, action: Callable[[], None], rank: int = 0) -> None:
        heapq.heappush(self._events, (t, rank, next(self._order), action))

    def _schedule_next_arrival(self) -> None:
        a = self._next_arrival
        if a is not None:
            self._at(a.time, self._arrive)

    @property
    def next_arrival_time(self) -> float:
        return self._next_arrival.time if self._next_arrival is not None else INF

    def _publish(self) -> None:
        assert self.pools is not None
        self.pools.publish()
        self._at(self.now + self.cluster.publish_interval, self._publish)

    # -- arrivals ------------------------------------------------------------------

    def _arrive(self) -> None:
        """Takes every arrival of this instant before any instance plans: requests
        that arrive together are batched together, not one alone and the rest later."""
        queue = self.policy if self.pools is None else self.pools.prefill
        accepted = False
        while self._next_arrival is not None and self._next_arrival.time <= self.now:
            a = self._next_arrival
            self._next_arrival = next(self._arrivals, None)
            r = SimRequest(
                len(self.requests) + len(self.rejected),
                a.client_id,
                a.time,
                a.prompt_len,
                a.output_len,
            )
            if not self._can_ever_run(r):
                # It would head its queue forever and block everything behind it.
                self.rejected.append(r)
                continue
            try:
                queue.add(r)
            except RequestRejectedError:
                self.rejected.append(r)
                continue
            self.requests.append(r)
            self.log.pending(self.now, r.client_id, +1)
            accepted = True
        self._schedule_next_arrival()
        if not accepted:
            return
        if self.pools is None:
            self._wake(self.nodes)
        else:
            self._dispatch_prefill()

    def _can_ever_run(self, r: SimRequest) -> bool:
        """Whether ``r`` fits an instance alone all the way to its last token (as the
        engine refuses a prompt that leaves no room under ``max_model_len``). A prefill
        instance must also fit a recompute of almost the whole request when decode
        may preempt."""
        whole = r.prompt_len + r.output_len
        if whole > self._decode_capacity:
            return False
        need = whole if self.cluster.admission == "optimistic" else r.prompt_len + 1
        return need <= self._prefill_capacity

    def _wake(self, nodes: list[_Node]) -> None:
        for node in nodes:
            if not node.busy:
                self._start(node)

    def _start(self, node: _Node) -> None:
        if self.pools is None:
            self._start_colocated(node)
        elif node in self.prefill_nodes:
            self._start_prefill(node)
        else:
            self._start_decode(node)

    # -- colocated -----------------------------------------------------------------

    def _start_colocated(self, node: _Node) -> None:
        if self.cluster.chunked_prefill is None:
            batch = admit_prefill_batch(
                self.policy, node, len(node.running), self.now, self.log, self.policy
            )
            if batch:
                for r in batch:
                    self.log.pending(self.now, r.client_id, -1)
                self._run(
                    node,
                    prefill_duration(node.latency, batch),
                    lambda: self._end_prefill_colocated(node, batch),
                )
                return
        else:
            self._admit_chunked(node)
            if node.prefilling:
                self._chunked_step(node)
                return
        if not node.running:
            node.busy = False
            return
        self._decode_step(node, self.policy, self.policy)

    def _admit_chunked(self, node: _Node) -> None:
        running = len(node.running) + len(node.prefilling)
        batch = admit_prefill_batch(self.policy, node, running, self.now, self.log, self.policy)
        for r in batch:
            self.log.pending(self.now, r.client_id, -1)
            node.prefilling.append([r, r.prefill_tokens])

    def _chunked_step(self, node: _Node) -> None:
        """One step of chunked prefill (Sarathi-style): every running request decodes
        one token and up to ``chunked_prefill`` prompt tokens are prefilled, oldest
        first. Its time is the two batch times added (a conservative model)."""
        budget = self.cluster.chunked_prefill
        assert budget is not None
        chunks: list[tuple[list, int]] = []
        for entry in node.prefilling:
            if budget == 0:
                break
            n = min(budget, entry[1])
            chunks.append((entry, n))
            budget -= n
        lens = [n for _, n in chunks]
        duration = node.latency.prefill_time(sum(lens), sum(n * n for n in lens), len(lens))
        decoding = list(node.running)
        while decoding and not node.reserves_output and node.free < len(decoding):
            victim = self.policy.preemption_victim(decoding)
            decoding.remove(victim)
            self._preempt(node, victim, self.policy)
        if decoding:
            duration += node.latency.decode_time(len(decoding), sum(r.context for r in decoding))
        self._run(node, duration, lambda: self._end_chunked(node, chunks, decoding), rank=1)

    def _end_chunked(
        self, node: _Node, chunks: list[tuple[list, int]], decoding: list[SimRequest]
    ) -> None:
        for r in decoding:
            if not self._produce(node, r, 1, self.policy):
                node.running.remove(r)
        for entry, n in chunks:
            entry[1] -= n
            if entry[1] == 0:
                node.prefilling.remove(entry)
                r = entry[0]
                r.recompute_len = 0
                if self._produce(node, r, 1, self.policy, prefilled=True):
                    self._join_decode(node, r)
        self._start(node)

    def _end_prefill_colocated(self, node: _Node, batch: list[SimRequest]) -> None:
        for r in batch:
            r.recompute_len = 0
            if self._produce(node, r, 1, self.policy, prefilled=True):
                self._join_decode(node, r)
        self._start(node)

    def _join_decode(self, node: _Node, r: SimRequest) -> None:
        if r.decode_start is None:
            r.decode_start = self.now
        node.running.append(r)

    # -- disaggregated ---------------------------------------------------------------

    def _dispatch_prefill(self) -> None:
        """The coordinator's rule (disagg/coordinator/core/dispatch.py): the pool's head
        goes at once to the prefill instance with the most KV room (its queued prompts
        counted as taken; the first instance on a tie) and is charged its input there; a
        head that fits none waits and is not overtaken. Each instance then batches from
        its own queue, so prompts waiting together are split over the instances rather
        than taken whole by the first to go idle."""
        assert self.pools is not None
        policy, nodes = self.pools.prefill, self.prefill_nodes
        while (head := policy.peek()) is not None:
            node = max(nodes, key=_Node.room)
            if node.room() < node.need(head, head.prefill_tokens):
                break
            policy.pop()
            if head.num_preemptions == 0:  # a recompute is not charged again
                policy.on_admitted(head, head.prompt_len)
            assert node.queue is not None
            node.queue.add(head)
        self._wake(nodes)

    def _start_prefill(self, node: _Node) -> None:
        assert node.queue is not None
        node.queue.order()
        batch = admit_prefill_batch(node.queue, node, 0, self.now, self.log, None)
        if not batch:
            node.busy = False
            return
        duration = prefill_duration(node.latency, batch)
        if self.cluster.prefill_jitter:
            duration *= math.exp(self.cluster.prefill_jitter * self._jitter.gauss(0.0, 1.0))
        self._run(node, duration, lambda: self._end_prefill(node, batch))

    def _end_prefill(self, node: _Node, batch: list[SimRequest]) -> None:
        assert self.pools is not None
        for r in batch:
            r.recompute_len = 0
            # The first token is output service: it is charged where output is charged.
            if self._produce(node, r, 1, self.pools.decode, prefilled=True):
                self.pools.decode.add(r)  # held here until a decode node pulls it
            else:
                self.log.pending(self.now, r.client_id, -1)
        if self.cluster.prefill_gap:  # the node's turnaround before its next batch
            self._run(node, self.cluster.prefill_gap, lambda: self._start(node))
        else:
            self._start(node)
        self._dispatch_prefill()  # a request that ended here freed its KV
        self._wake(self.decode_nodes)

    def _start_decode(self, node: _Node) -> None:
        assert self.pools is not None
        policy = self.pools.decode

        def pull(head: SimRequest) -> None:
            self.log.pending(self.now, head.client_id, -1)
            node.used += node.footprint(head)
            node.incoming.append(head)
            t = transfer_time(
                head.context - 1,  # the newest token's KV is computed by decode
                node.latency.kv_bytes_per_token,
                self.cluster.transfer_bandwidth,
                self.cluster.transfer_latency,
            )
            head.transfer_end = self.now + t
            self._at(head.transfer_end, lambda r=head, dst=node: self._end_transfer(r, dst))

        limits = node.limits(len(node.running) + len(node.incoming), token_budget=None)
        take_in_order(policy, limits, lambda r: node.need(r, r.context), on_take=pull)
        if not node.running:
            node.busy = False
            return
        self._decode_step(node, policy, self.pools.prefill)

    def _end_transfer(self, r: SimRequest, node: _Node) -> None:
        source = self.nodes[r.instance] if r.instance >= 0 else None
        if source is not None:
            source.used -= source.footprint(r)
        r.decode_start = self.now
        r.instance = node.index
        node.incoming.remove(r)
        node.running.append(r)
        if source is not None:
            self._dispatch_prefill()  # the source has room again
        if not node.busy:
            self._start(node)

    # -- decode, shared ------------------------------------------------------------

    def _decode_step(self, node: _Node, policy, requeue_to) -> None:
        """A macro-step of k decode steps over ``node.running``."""
        while node.running and not node.reserves_output and node.free < len(node.running):
            victim = policy.preemption_victim(node.running)
            self._preempt(node, victim, requeue_to)
        if not node.running:
            node.busy = False
            if self.pools is None:
                self._start(node)
            return
        b = len(node.running)
        context = sum(r.context for r in node.running)
        step_time = node.latency.decode_time(b, context)
        k = min(r.remaining for r in node.running)
        if not node.reserves_output:
            k = min(k, node.free // b)
        growth = node.latency.decode_time(b, context + b) - step_time
        k = min(k, steps_until(self._cut_time(node, policy), self.now, step_time, growth))
        duration = decode_duration(node.latency, b, context, k)
        batch = list(node.running)
        self._run(node, duration, lambda: self._end_decode(node, batch, k, policy), rank=1)

    def _cut_time(self, node: _Node, policy) -> float:
        """When something could join this node's batch."""
        waiting = policy.peek() is not None
        if waiting and self._another_head_fits(node, policy):
            return self.now  # counters move each step: re-decide after one
        if self.pools is None:
            # Prefill goes first. A waiting head that does not fit waits for a finish
            # (k stops there); with counter order a new arrival may become the head.
            if waiting and not isinstance(policy, CounterOrdered):
                return INF
            return self.next_arrival_time
        cut = min((r.transfer_end for r in node.incoming), default=INF)
        if not waiting or isinstance(policy, CounterOrdered):
            # A prefill under way ends with a request to pull. The next arrival, if a
            # prefill instance is idle, can be ready no sooner than its prefill alone.
            cut = min(cut, min((p.busy_until for p in self.prefill_nodes if p.busy), default=INF))
            a = self._next_arrival
            if a is not None and not all(p.busy for p in self.prefill_nodes):
                n = a.prompt_len
                cut = min(cut, a.time + self.prefill_nodes[0].latency.prefill_time(n, n * n, 1))
        return cut

    def _another_head_fits(self, node: _Node, policy) -> bool:
        """Under counter order the head changes as running requests are charged, so a
        waiting client's head that fits now may be picked at the next step."""
        if not isinstance(policy, CounterOrdered):
            return False
        holding = len(node.running) + len(node.incoming) + len(node.prefilling)
        limits = node.limits(holding, token_budget=None)
        held = (lambda r: r.prefill_tokens) if self.pools is None else (lambda r: r.context)
        return any(limits.admits(node.need(h, held(h))) for h in policy.heads())

    def _end_decode(self, node: _Node, batch: list[SimRequest], k: int, policy) -> None:
        # The hot loop of a simulation: what _produce does, for a whole batch at once.
        now, on_tokens, log = self.now, policy.on_tokens, self.log.output
        done = []
        for r in batch:
            r.produced += k
            on_tokens(r, k)
            log(now, r, k)
            if r.produced >= r.output_len:
                done.append(r)
        if not node.reserves_output:
            node.used += k * len(batch)
        for r in done:
            self._finish(node, r)
            node.running.remove(r)
        self._start(node)

    def _produce(
        self, node: _Node, r: SimRequest, n: int, policy, *, prefilled: bool = False
    ) -> bool:
        """``r`` produced ``n`` tokens now; returns whether it goes on. A prefill's token
        (``prefilled``) has its slot already, taken at admission."""
        if r.first_token_time is None:
            r.first_token_time = self.now
        r.produced += n
        if not node.reserves_output and not prefilled:
            node.used += n
        policy.on_tokens(r, n)
        self.log.output(self.now, r, n)
        if r.produced < r.output_len:
            return True
        self._finish(node, r)
        return False

    def _finish(self, node: _Node, r: SimRequest) -> None:
        r.finish_time = self.now
        node.used -= node.footprint(r)
        for p in self._policies():
            p.on_finished(r)

    def _preempt(self, node: _Node, victim: SimRequest, requeue_to) -> None:
        node.running.remove(victim)
        node.used -= node.footprint(victim)
        victim.recompute_len = victim.context
        victim.num_preemptions += 1
        victim.instance = -1
        requeue_to.requeue(victim)
        self.log.pending(self.now, victim.client_id, +1)
        if self.pools is not None:
            self._dispatch_prefill()

    def _policies(self):
        return (self.policy,) if self.pools is None else (self.pools.prefill, self.pools.decode)

    def _run(self, node: _Node, duration: float, on_end: Callable[[], None], rank: int = 0) -> None:
        node.busy = True
        node.busy_until = self.now + duration
        self._at(node.busy_until, on_end, rank)

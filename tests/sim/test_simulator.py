"""The cluster simulator: exact timings against hand computation and a per-step
reference, conservation of requests, tokens and KV memory, work conservation,
preemption, and the fairness the shared policy objects deliver through it."""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

import disagg.sim.simulator as simulator_module
from disagg.errors import ConfigError
from disagg.scheduling import FairnessConfig, LinearCost
from disagg.sim.cli import CapacityOverride
from disagg.sim.cluster import ClusterSpec
from disagg.sim.latency import load_profile, transfer_time
from disagg.sim.metrics import client_service, max_backlogged_difference, summarize
from disagg.sim.simulator import SimResult, Simulator
from disagg.sim.workload import Arrival, Workload, workload_from_spec

PROFILE = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "distserve_opt13b_a100.json"


@dataclass(frozen=True)
class LinearLatency:
    """Batch times linear in tokens, so expected times are sums a person can check.
    The coefficients are not round, so step boundaries do not tie by accident."""

    kv_capacity_tokens: int = 100_000
    kv_bytes_per_token: int = 1000
    tp: int = 1
    pp: int = 1
    prefill_base: float = 0.0103
    prefill_per_token: float = 1.07e-4
    decode_base: float = 0.0197
    decode_per_token: float = 1.13e-5

    def prefill_time(self, num_tokens: int, sum_sq_tokens: int, batch_size: int) -> float:
        return self.prefill_base + self.prefill_per_token * num_tokens

    def decode_time(self, batch_size: int, total_context: int) -> float:
        return self.decode_base + self.decode_per_token * total_context


LIN = LinearLatency()


def fitted(capacity: int | None = None):
    model = load_profile(PROFILE).model(1)
    return model if capacity is None else CapacityOverride(model, capacity)


def workload(arrivals: list[Arrival], duration: float, weights: dict | None = None) -> Workload:
    arrivals = sorted(arrivals, key=lambda a: a.time)
    ids = list(dict.fromkeys([*(weights or {}), *(a.client_id for a in arrivals)]))
    return Workload(duration, arrivals, {c: (weights or {}).get(c, 1.0) for c in ids}, ids)


def extended(w: Workload, duration: float) -> Workload:
    """The same arrivals, measured for longer (so everything can finish)."""
    return Workload(duration, w.arrivals, w.weights, w.client_ids)


def simulate(w: Workload, cluster: ClusterSpec | None = None, policy="fcfs", latency=LIN, **kw):
    return Simulator(w, cluster or ClusterSpec(), policy=policy, latency=latency, **kw).run()


class WatchedNode(simulator_module._Node):
    """Records every value ``used`` takes: KV memory must stay in [0, capacity] at every
    change, not only between events."""

    @property
    def used(self) -> int:
        return self._used

    @used.setter
    def used(self, value: int) -> None:
        self._used = value
        self.peak = max(getattr(self, "peak", 0), value)
        self.low = min(getattr(self, "low", 0), value)


@pytest.fixture
def watched(monkeypatch):
    monkeypatch.setattr(simulator_module, "_Node", WatchedNode)


def record_steps(sim: Simulator) -> list[tuple[int, float, float]]:
    """(instance, start, end) of every step the simulator runs."""
    steps: list[tuple[int, float, float]] = []
    run = sim._run

    def recording(node, duration, on_end, rank=0):
        steps.append((node.index, sim.now, sim.now + duration))
        run(node, duration, on_end, rank)

    sim._run = recording
    return steps


# -- exact timings -------------------------------------------------------------------


@pytest.mark.parametrize("latency", [LIN, fitted()], ids=["linear", "fitted"])
@pytest.mark.parametrize("output_len", [1, 2, 3, 8, 101])
def test_lone_colocated_request_times_are_prefill_plus_each_decode_step(latency, output_len):
    prompt = 200
    w = workload([Arrival(1.5, "a", prompt, output_len)], 100.0)
    (r,) = simulate(w, latency=latency).requests
    prefill = latency.prefill_time(prompt, prompt * prompt, 1)
    # Step j feeds the j-th output token: the context then is prompt + j.
    decode = sum(latency.decode_time(1, prompt + j) for j in range(1, output_len))
    assert r.prefill_start == 1.5
    assert r.ttft == pytest.approx(prefill, rel=1e-12)
    # A one-token request never decodes.
    assert r.decode_start == (r.first_token_time if output_len > 1 else None)
    assert r.finish_time == pytest.approx(1.5 + prefill + decode, rel=1e-12)
    assert r.produced == output_len


def test_lone_disaggregated_request_adds_the_kv_transfer():
    prompt, output_len = 300, 6
    decode_latency = LinearLatency(decode_base=0.0311, decode_per_token=2.9e-5)
    cluster = ClusterSpec(kind="disagg", transfer_bandwidth=2e9, transfer_latency=0.004)
    w = workload([Arrival(0.25, "a", prompt, output_len)], 100.0)
    (r,) = simulate(w, cluster, decode_latency=decode_latency).requests
    prefill = LIN.prefill_time(prompt, prompt * prompt, 1)
    # The prompt's KV moves; the first token's KV is computed by the first decode step.
    transfer = 0.004 + prompt * LIN.kv_bytes_per_token / 2e9
    decode = sum(decode_latency.decode_time(1, prompt + j) for j in range(1, output_len))
    assert r.first_token_time == pytest.approx(0.25 + prefill, rel=1e-12)
    assert r.transfer_end == pytest.approx(0.25 + prefill + transfer, rel=1e-12)
    assert r.decode_start == r.transfer_end
    assert r.finish_time == pytest.approx(0.25 + prefill + transfer + decode, rel=1e-12)


def test_chunked_prefill_splits_the_prompt_and_decodes_after_it():
    w = workload([Arrival(0.0, "a", 100, 3)], 100.0)
    (r,) = simulate(w, ClusterSpec(chunked_prefill=40)).requests
    chunks = [LIN.prefill_time(n, n * n, 1) for n in (40, 40, 20)]
    assert r.first_token_time == pytest.approx(sum(chunks), rel=1e-12)
    decode = LIN.decode_time(1, 101) + LIN.decode_time(1, 102)
    assert r.finish_time == pytest.approx(sum(chunks) + decode, rel=1e-12)


def reference_colocated(arrivals, latency, max_batch_size, max_batch_tokens):
    """One instance, FCFS, prefill first, unlimited KV, simulated one decode step at a
    time: (first token, finish) per request."""
    t, i, n = 0.0, 0, len(arrivals)
    waiting: deque[int] = deque()
    running: list[int] = []
    produced: dict[int, int] = {}
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    while i < n or waiting or running:
        while i < n and arrivals[i].time <= t:
            waiting.append(i)
            i += 1
        if waiting and len(running) < max_batch_size:
            batch, tokens = [], 0
            while waiting and len(running) + len(batch) < max_batch_size:
                p = arrivals[waiting[0]].prompt_len
                if batch and tokens + p > max_batch_tokens:
                    break
                batch.append(waiting.popleft())
                tokens += p
            sq = sum(arrivals[j].prompt_len ** 2 for j in batch)
            t += latency.prefill_time(tokens, sq, len(batch))
            for j in batch:
                first[j], produced[j] = t, 1
                if arrivals[j].output_len == 1:
                    finish[j] = t
                else:
                    running.append(j)
        elif running:
            ctx = sum(arrivals[j].prompt_len + produced[j] for j in running)
            t += latency.decode_time(len(running), ctx)
            for j in list(running):
                produced[j] += 1
                if produced[j] == arrivals[j].output_len:
                    finish[j] = t
                    running.remove(j)
        else:
            t = arrivals[i].time
    return first, finish


def reference_disagg(arrivals, latency, spec: ClusterSpec):
    """One prefill and one decode instance, FCFS, unlimited KV, one decode step at a
    time: the decode instance pulls at every step boundary (or when idle) and a pulled
    request joins at the first boundary after its transfer ends."""
    n = len(arrivals)
    ready: dict[int, float] = {}
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    t, i = 0.0, 0
    waiting: deque[int] = deque()
    while i < n or waiting:
        while i < n and arrivals[i].time <= t:
            waiting.append(i)
            i += 1
        if not waiting:
            t = arrivals[i].time
            continue
        batch, tokens = [], 0
        while waiting and len(batch) < spec.max_batch_size:
            p = arrivals[waiting[0]].prompt_len
            if batch and tokens + p > spec.max_batch_tokens:
                break
            batch.append(waiting.popleft())
            tokens += p
        t += latency.prefill_time(
            tokens, sum(arrivals[j].prompt_len ** 2 for j in batch), len(batch)
        )
        for j in batch:
            first[j] = t
            if arrivals[j].output_len == 1:
                finish[j] = t
            else:
                ready[j] = t
    t = 0.0
    running: list[int] = []
    incoming: list[tuple[int, float]] = []
    produced = dict.fromkeys(ready, 1)
    pulled: set[int] = set()
    while len(pulled) < len(ready) or running or incoming:
        for j, end in list(incoming):
            if end <= t:
                incoming.remove((j, end))
                running.append(j)
        for j in sorted(j for j in ready if j not in pulled and ready[j] <= t):
            if len(running) + len(incoming) >= spec.max_batch_size:
                break
            pulled.add(j)
            xfer = transfer_time(
                arrivals[j].prompt_len,
                latency.kv_bytes_per_token,
                spec.transfer_bandwidth,
                spec.transfer_latency,
            )
            incoming.append((j, t + xfer))
        if running:
            ctx = sum(arrivals[j].prompt_len + produced[j] for j in running)
            t += latency.decode_time(len(running), ctx)
            for j in list(running):
                produced[j] += 1
                if produced[j] == arrivals[j].output_len:
                    finish[j] = t
                    running.remove(j)
        else:
            t = min([ready[j] for j in ready if j not in pulled] + [e for _, e in incoming])
    return first, finish


def random_arrivals(rng: random.Random, count: int, span: float, max_prompt: int, max_out: int):
    return sorted(
        (
            # Times on a 10-ms grid, so some requests arrive together.
            Arrival(
                round(rng.uniform(0, span), 2),
                "a",
                rng.randint(1, max_prompt),
                rng.randint(1, max_out),
            )
            for _ in range(count)
        ),
        key=lambda a: a.time,
    )


@pytest.mark.parametrize("latency", [LIN, fitted()], ids=["linear", "fitted"])
def test_colocated_macro_steps_match_a_step_by_step_reference(latency):
    rng = random.Random(7)
    for trial in range(40):
        arrivals = random_arrivals(rng, rng.randint(1, 25), 4.0, 600, 250)
        spec = ClusterSpec(max_batch_size=rng.choice([3, 256]), max_batch_tokens=1024)
        result = simulate(workload(arrivals, 10_000.0), spec, latency=latency)
        first, finish = reference_colocated(arrivals, latency, spec.max_batch_size, 1024)
        for j, r in enumerate(result.requests):
            assert r.first_token_time == pytest.approx(first[j], rel=1e-9), (trial, j)
            assert r.finish_time == pytest.approx(finish[j], rel=1e-9), (trial, j)


def test_disaggregated_macro_steps_match_a_step_by_step_reference():
    rng = random.Random(11)
    spec = ClusterSpec(
        kind="disagg", max_batch_size=6, max_batch_tokens=400, transfer_bandwidth=1e8
    )
    for trial in range(60):
        arrivals = random_arrivals(rng, rng.randint(1, 15), 5.0, 300, 200)
        result = simulate(workload(arrivals, 10_000.0), spec)
        first, finish = reference_disagg(arrivals, LIN, spec)
        for j, r in enumerate(result.requests):
            assert r.first_token_time == pytest.approx(first[j], rel=1e-9), (trial, j)
            assert r.finish_time == pytest.approx(finish[j], rel=1e-9), (trial, j)


def test_an_arrival_joins_at_the_next_step_boundary_however_long_the_decode():
    # A 2,000-token decode is one long macro-step; the newcomer must not wait for it.
    w = workload([Arrival(0.0, "a", 100, 2000), Arrival(10.0, "b", 100, 5)], 100.0)
    a, b = simulate(w).requests
    t, context = a.first_token_time, 101
    while t < 10.0:
        t += LIN.decode_time(1, context)
        context += 1
    assert b.prefill_start == pytest.approx(t, rel=1e-12)


def test_a_decode_instance_pulls_a_new_request_during_a_long_decode():
    w = workload([Arrival(0.0, "a", 100, 1000), Arrival(1.0, "b", 100, 10)], 100.0)
    a, b = simulate(w, ClusterSpec(kind="disagg")).requests
    step = LIN.decode_time(2, 1300)  # longer than any step of this run
    # Pulled within a step of its prefill's end, not after a's 1,000 tokens.
    assert b.transfer_end - b.first_token_time < step + 0.002
    assert b.finish_time < 2.0 < a.finish_time


def test_requests_arriving_together_are_prefilled_together():
    w = workload([Arrival(0.5, "a", 100, 2), Arrival(0.5, "b", 50, 2)], 100.0)
    a, b = simulate(w).requests
    assert a.first_token_time == b.first_token_time
    assert a.first_token_time == pytest.approx(0.5 + LIN.prefill_time(150, 12500, 2))


def test_prompts_go_to_a_prefill_instance_on_arrival_as_the_coordinator_sends_them():
    """Each prompt goes, as it arrives, to the prefill instance with the most KV room
    (its queued prompts counted as taken), and each instance batches its own queue, as
    the coordinator and the prefill nodes do. Instance 0 is free first, but C and D
    went to instance 1 (B is shorter than A) and only E, once they had taken instance
    1's room, to instance 0; instances pulling from one shared queue would have run C,
    D and E as one batch on instance 0."""
    arrivals = [
        Arrival(0.0, "a", 1000, 2),  # A: instance 0 (a tie goes to the first)
        Arrival(0.05, "a", 600, 2),  # B: instance 1, which has more room
        Arrival(0.06, "a", 300, 2),  # C
        Arrival(0.07, "a", 300, 2),  # D
        Arrival(0.08, "a", 300, 2),  # E
    ]
    cluster = ClusterSpec(kind="disagg", prefill=2, decode=1)
    _, _, c, d, e = simulate(workload(arrivals, 5.0), cluster).requests
    a_end = LIN.prefill_time(1000, 1000**2, 1)
    b_end = 0.05 + LIN.prefill_time(600, 600**2, 1)
    assert a_end < b_end
    assert [c.prefill_start, d.prefill_start, e.prefill_start] == pytest.approx(
        [b_end, b_end, a_end], rel=1e-12
    )
    assert c.first_token_time == d.first_token_time
    assert c.first_token_time == pytest.approx(b_end + LIN.prefill_time(600, 2 * 300**2, 2))
    assert e.first_token_time == pytest.approx(a_end + LIN.prefill_time(300, 300**2, 1))


# -- conservation --------------------------------------------------------------------

MIXED = {
    "duration": 20,
    "seed": 3,
    "clients": [
        {
            "id": "a",
            "arrival": "poisson",
            "rate": 6,
            "input_len": {"dist": "uniform", "low": 1, "high": 400},
            "output_len": {"dist": "uniform", "low": 1, "high": 300},
        },
        {
            "id": "b",
            "arrival": "gamma",
            "cv": 3,
            "rate": 4,
            "input_len": {"dist": "uniform", "low": 1, "high": 60},
            "output_len": {"dist": "uniform", "low": 1, "high": 600},
            "weight": 2,
        },
        {
            "id": "c",
            "arrival": "uniform",
            "rate": 1,
            "input_len": 900,
            "output_len": 200,
        },
    ],
}

CONFIGS = [
    ("fcfs", ClusterSpec()),
    ("vtc", ClusterSpec(admission="reserve")),
    ("lcf", ClusterSpec(chunked_prefill=128)),
    ("vtc", ClusterSpec(chunked_prefill=64, max_batch_size=8)),
    ("rpm", ClusterSpec(instances=2)),
    ("vtc", ClusterSpec(instances=3, max_batch_tokens=512)),
    ("fcfs", ClusterSpec(kind="disagg", prefill=2, decode=2)),
    ("rpm", ClusterSpec(kind="disagg")),
    ("lcf", ClusterSpec(kind="disagg", admission="reserve")),
    ("per-stage-vtc", ClusterSpec(kind="disagg", prefill=2, decode=1)),
    ("two-stage-vtc", ClusterSpec(kind="disagg", prefill=1, decode=2)),
    ("two-stage-vtc", ClusterSpec(kind="disagg", publish_interval=0.5, admission="reserve")),
]


def config_id(config) -> str:
    policy, c = config
    return f"{policy}-{c.kind}-{c.admission}" + (
        f"-chunk{c.chunked_prefill}" if c.chunked_prefill else ""
    )


def check_conservation(w: Workload, result: SimResult) -> None:
    n = len(w.arrivals)
    ids = [r.seq_id for r in result.requests] + [r.seq_id for r in result.rejected]
    assert sorted(ids) == list(range(n))  # each arrival exactly once
    for r in result.requests:
        assert 0 <= r.produced <= r.output_len
        assert (r.finish_time is not None) == (r.produced == r.output_len)
        times = [
            r.arrival_time,
            r.prefill_start,
            r.first_token_time,
            r.transfer_end if result.cluster.kind == "disagg" else r.first_token_time,
            r.decode_start if r.output_len > 1 else r.first_token_time,
            r.finish_time,
        ]
        seen = [t for t in times if t is not None]
        assert seen == sorted(seen), r
        assert all(t <= result.duration for t in seen)
        # An event is only missing after the first missing one (it did not happen yet).
        assert times[: len(seen)] == seen, r
    # Service is charged once per input and once per output token, whatever was
    # recomputed after preemptions.
    cost = result.metric_cost
    expected = dict.fromkeys(result.client_ids, 0.0)
    for r in result.requests:
        admitted = cost(r.prompt_len, 0) if r.prefill_start is not None else 0.0
        charged = admitted + cost(r.prompt_len, r.produced) - cost(r.prompt_len, 0)
        expected[r.client_id] += charged / result.weights[r.client_id]
    service = client_service(result)
    for c in result.client_ids:
        assert service[c] == pytest.approx(expected[c], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_request_token_and_kv_slot_is_accounted_for(config, watched):
    policy, cluster = config
    base = workload_from_spec(MIXED)
    capacity = 2500  # small: optimistic admission preempts
    latency = LinearLatency(kv_capacity_tokens=capacity)
    for w in (base, extended(base, 100_000.0)):
        sim = Simulator(w, cluster, policy=policy, latency=latency)
        result = sim.run()
        check_conservation(w, result)
        for node in sim.nodes:
            assert node.low >= 0 and node.peak <= capacity, (node.index, node.low, node.peak)
        if w is base:
            assert any(not r.finished for r in result.requests)  # the window cut work off
    # Run long enough, everything finishes and every instance is empty again.
    assert all(r.finished for r in result.requests)
    assert all(node.used == 0 and not node.running for node in sim.nodes)
    if policy == "rpm":
        assert result.rejected  # client a sends over 60 a minute
    preemptions = sum(r.num_preemptions for r in result.requests)
    assert (preemptions == 0) == (cluster.admission == "reserve")


def held_kv(node, result: SimResult) -> int:
    """The KV ``node`` should account for: the footprints of what it decodes or is
    receiving, what it is prefilling (prompt or recompute plus the slot of the token
    the prefill produces, or the whole output when reserving) and, on a prefill
    instance, what it prefilled and no decode instance has received yet."""
    total = 0
    for r in result.requests:
        if r.finished:
            continue
        if r in node.running or r in node.incoming:
            total += node.footprint(r)
        elif r.instance == node.index:
            if r.first_token_time is None or r.recompute_len > 0:
                total += r.prefill_tokens + (r.remaining if node.reserves_output else 1)
            else:
                total += r.context
    return total


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_used_memory_is_the_kv_of_what_each_instance_holds(config):
    policy, cluster = config
    w = workload_from_spec(MIXED)
    for stop in (3.0, 7.5, 20.0):  # stopped mid-run, mid-step
        sim = Simulator(
            Workload(stop, [a for a in w.arrivals if a.time <= stop], w.weights, w.client_ids),
            cluster,
            policy=policy,
            latency=LinearLatency(kv_capacity_tokens=2500),
        )
        result = sim.run()
        for node in sim.nodes:
            assert node.used == held_kv(node, result), (stop, node.index)


# -- work conservation ---------------------------------------------------------------


def test_colocated_instance_never_idles_while_work_waits():
    # 30 requests at once, at most 4 in a batch: the instance runs back to back and
    # the last finish is exactly the sum of its steps.
    arrivals = [Arrival(0.0, "a", 50 + 7 * i, 20 + 3 * i) for i in range(30)]
    sim = Simulator(
        workload(arrivals, 1000.0), ClusterSpec(max_batch_size=4), policy="fcfs", latency=LIN
    )
    steps = record_steps(sim)
    result = sim.run()
    starts = [s for _, s, _ in steps]
    ends = [e for _, _, e in steps]
    assert starts[0] == 0.0
    assert starts[1:] == pytest.approx(ends[:-1], rel=1e-12)  # no gap
    assert max(r.finish_time for r in result.requests) == pytest.approx(
        sum(e - s for _, s, e in steps), rel=1e-12
    )


def test_idle_instances_all_take_work():
    # Two colocated instances, batch size 1: the second request does not wait for the first.
    w = workload([Arrival(0.0, "a", 100, 50), Arrival(0.0, "b", 100, 50)], 100.0)
    a, b = simulate(w, ClusterSpec(instances=2, max_batch_size=1)).requests
    assert a.first_token_time == b.first_token_time == pytest.approx(LIN.prefill_time(100, 0, 1))
    assert {a.instance, b.instance} == {0, 1}


def test_prefill_instance_prefills_back_to_back_while_its_queue_is_full():
    arrivals = [Arrival(0.0, "a", 400, 2) for _ in range(20)]
    spec = ClusterSpec(kind="disagg", max_batch_tokens=1000)
    sim = Simulator(workload(arrivals, 1000.0), spec, policy="fcfs", latency=LIN)
    steps = record_steps(sim)
    result = sim.run()
    prefill = [(s, e) for i, s, e in steps if i == 0]
    assert len(prefill) == 10  # two 400-token prompts per 1,000-token batch
    assert [s for s, _ in prefill[1:]] == pytest.approx([e for _, e in prefill[:-1]])
    assert max(r.first_token_time for r in result.requests) == pytest.approx(
        10 * LIN.prefill_time(800, 0, 2)
    )


def test_a_served_prefill_gap_delays_the_next_batch_not_the_first_token():
    gap = 0.0031
    arrivals = [Arrival(0.0, "a", 400, 2) for _ in range(20)] + [Arrival(50.0, "b", 400, 2)]
    spec = ClusterSpec(kind="disagg", max_batch_tokens=1000, prefill_gap=gap)
    result = simulate(workload(arrivals, 1000.0), spec)
    batch = LIN.prefill_time(800, 0, 2)
    firsts = sorted({r.first_token_time for r in result.requests if r.client_id == "a"})
    assert firsts == pytest.approx([k * batch + (k - 1) * gap for k in range(1, 11)])
    (late,) = [r for r in result.requests if r.client_id == "b"]  # found the node idle
    assert late.first_token_time == pytest.approx(50.0 + LIN.prefill_time(400, 0, 1))


def test_prefill_jitter_spreads_batch_times_around_the_model_repeatably():
    arrivals = [Arrival(0.0, "a", 400, 2) for _ in range(400)]
    w = workload(arrivals, 10_000.0)

    def batch_times(seed: int) -> list[float]:
        spec = ClusterSpec(
            kind="disagg", max_batch_tokens=400, prefill_jitter=0.2, jitter_seed=seed
        )
        firsts = sorted(r.first_token_time for r in simulate(w, spec).requests)
        return [b - a for a, b in zip([0.0, *firsts[:-1]], firsts, strict=True)]

    times = batch_times(0)
    logs = [math.log(t / LIN.prefill_time(400, 0, 1)) for t in times]
    assert statistics.pstdev(logs) == pytest.approx(0.2, abs=0.03)
    assert abs(statistics.fmean(logs)) < 0.04  # centred on the model's time
    assert batch_times(0) == times and batch_times(1) != times
    with pytest.raises(ConfigError, match="prefill_jitter"):
        ClusterSpec(kind="disagg", prefill_jitter=float("nan"))


# -- preemption ----------------------------------------------------------------------


def burst(client: str, count: int, prompt: int, output: int, at: float = 0.0) -> list[Arrival]:
    return [Arrival(at, client, prompt, output) for _ in range(count)]


@pytest.mark.parametrize("kind", ["colocated", "disagg"])
def test_optimistic_admission_preempts_and_still_finishes_every_request(kind, watched):
    arrivals = burst("a", 12, 200, 300) + burst("b", 12, 50, 400, at=0.3)
    w = workload(arrivals, 10_000.0)
    sim = Simulator(
        w, ClusterSpec(kind=kind), policy="fcfs", latency=LinearLatency(kv_capacity_tokens=2000)
    )
    result = sim.run()
    assert sum(r.num_preemptions for r in result.requests) > 0
    assert all(r.finished and r.produced == r.output_len for r in result.requests)
    assert all(node.peak <= 2000 for node in sim.nodes)
    check_conservation(w, result)
    # Recompute costs time but no service: each request is charged once.
    assert summarize(result)["clients"]["a"]["service"] == 12 * (200 + 2 * 300)


@pytest.mark.parametrize("kind", ["colocated", "disagg"])
def test_reserve_admission_never_preempts(kind, watched):
    arrivals = burst("a", 12, 200, 300) + burst("b", 12, 50, 400, at=0.3)
    sim = Simulator(
        workload(arrivals, 10_000.0),
        ClusterSpec(kind=kind, admission="reserve"),
        policy="fcfs",
        latency=LinearLatency(kv_capacity_tokens=2000),
    )
    result = sim.run()
    assert all(r.num_preemptions == 0 and r.finished for r in result.requests)
    assert all(node.peak <= 2000 for node in sim.nodes)

    # Each request holds prompt + its whole output from admission (450 or 500 tokens):
    # never more than four decode at once in 2,000 tokens.
    def decoding_at(t: float) -> int:
        return sum(r.decode_start <= t < r.finish_time for r in result.requests)

    assert max(decoding_at(r.decode_start) for r in result.requests) == 4


def test_a_request_larger_than_the_kv_pool_is_refused_not_left_blocking_the_queue():
    w = workload([Arrival(0.0, "a", 100, 1000), Arrival(50.0, "b", 10, 10)], 100.0)
    result = simulate(w, latency=LinearLatency(kv_capacity_tokens=500))
    assert [r.client_id for r in result.rejected] == ["a"]
    (b,) = result.requests
    assert b.finished


# -- fairness ------------------------------------------------------------------------


VTC_COST = LinearCost()  # w_in = 1, w_out = 2, the simulator's default


def flood_first(seed: int = 0, duration: float = 180.0) -> Workload:
    """Client a sends 600 requests at once; b then keeps sending, 10 a second. Random
    lengths; both stay backlogged for the whole run."""
    rng = random.Random(seed)
    a = [Arrival(0.0, "a", rng.randint(8, 512), rng.randint(8, 512)) for _ in range(600)]
    b = [
        Arrival(0.5 + i / 10, "b", rng.randint(8, 64), rng.randint(8, 1024))
        for i in range(int(duration * 10) - 5)
    ]
    return workload(a + b, duration)


def vtc_bound(
    w: Workload, cluster: ClusterSpec, capacity: int, cost: LinearCost = VTC_COST
) -> float:
    """VTC's bound for two backlogged clients, 2·max(w_in·L_in, w_out·M), with M the
    most tokens a batch can hold: the KV pool, or max_batch_size longest requests."""
    longest_in = max(a.prompt_len for a in w.arrivals)
    longest = max(a.prompt_len + a.output_len for a in w.arrivals)
    batch_tokens = min(capacity, cluster.max_batch_size * longest) * cluster.instances
    return 2 * max(cost.w_in * longest_in, cost.w_out * batch_tokens)


@pytest.mark.parametrize("latency", ["linear", "fitted"])
def test_vtc_keeps_backlogged_clients_within_its_bound_and_fcfs_does_not(latency):
    # The bound holds when a batch's future output is bounded by the memory it has
    # reserved, which is what reserving admission (S-LoRA's, the VTC artifact's) does.
    capacity = 3000
    model = LinearLatency(kv_capacity_tokens=capacity) if latency == "linear" else fitted(capacity)
    cluster = ClusterSpec(admission="reserve")
    for seed in range(3):
        w = flood_first(seed)
        bound = vtc_bound(w, cluster, capacity)
        vtc = max_backlogged_difference(simulate(w, cluster, "vtc", model))
        fcfs_result = simulate(w, cluster, "fcfs", model)
        fcfs = max_backlogged_difference(fcfs_result)
        assert 0 < vtc <= bound
        assert fcfs > bound and fcfs > 4 * vtc
        assert client_service(fcfs_result)["b"] == 0  # starved for the whole run


def test_vtc_with_optimistic_admission_stays_far_from_fcfs_starvation():
    capacity = 3000
    cluster = ClusterSpec(admission="optimistic")
    for seed in range(3):
        w = flood_first(seed)
        results = {p: simulate(w, cluster, p, fitted(capacity)) for p in ("vtc", "fcfs")}
        assert sum(r.num_preemptions for r in results["vtc"].requests) > 0
        vtc, fcfs = (max_backlogged_difference(results[p]) for p in ("vtc", "fcfs"))
        assert fcfs > 10 * vtc
        served = client_service(results["vtc"])
        assert served["a"] == pytest.approx(served["b"], rel=0.1)


@pytest.mark.parametrize("policy", ["vtc", "lcf"])
def test_a_request_that_becomes_the_head_and_fits_is_admitted_at_the_next_step(policy):
    # a decodes four requests and waits with a 900-token prompt that does not fit; b
    # arrives with a small one. b is lifted to a's counter (VTC) or below it (LCF), so
    # from the first step boundary after its arrival b is the head, and it fits.
    arrivals = [*burst("a", 4, 300, 150), Arrival(0.0, "a", 900, 10), Arrival(0.5, "b", 10, 5)]
    result = simulate(
        workload(arrivals, 100.0), ClusterSpec(), policy, LinearLatency(kv_capacity_tokens=2000)
    )
    b = result.requests[-1]
    step = LIN.decode_time(4, 4 * 450)  # longer than any step before b joins
    assert b.prefill_start < 0.5 + 2 * step


def test_weighted_vtc_serves_backlogged_clients_in_proportion_to_their_weights():
    for weights in ({"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 1.0}):
        w = workload(burst("a", 500, 128, 128) + burst("b", 500, 128, 128), 120.0, weights)
        result = simulate(w, ClusterSpec(), "vtc", LinearLatency(kv_capacity_tokens=5000))
        served = client_service(result)  # weighted service
        raw = {c: served[c] * weights[c] for c in served}
        ratio = raw["b"] / raw["a"]
        assert ratio == pytest.approx(weights["b"] / weights["a"], rel=0.05)
        assert summarize(result)["unfinished"] > 0  # both stayed backlogged


def service_between(result: SimResult, start: float, end: float) -> dict[str, float]:
    out = dict.fromkeys(result.client_ids, 0.0)
    for t, c, amount in result.log.events:
        if start <= t < end:
            out[c] += amount
    return out


def test_an_idle_client_gets_no_burst_on_return_under_vtc_but_does_under_lcf():
    # a is backlogged throughout; b sends a little, goes quiet for 150 s, then floods.
    arrivals = (
        burst("a", 1500, 128, 128) + burst("b", 5, 128, 128) + burst("b", 400, 128, 128, at=200.0)
    )
    w = workload(arrivals, 300.0)
    latency = LinearLatency(kv_capacity_tokens=4000)
    share = {}
    for policy in ("vtc", "lcf"):
        after = service_between(simulate(w, ClusterSpec(), policy, latency), 200.0, 260.0)
        share[policy] = after["b"] / (after["a"] + after["b"])
    assert share["vtc"] == pytest.approx(0.5, abs=0.1)
    assert share["lcf"] > 0.95  # b spends the credit it banked while away


def test_rpm_rejects_exactly_the_requests_over_the_limit():
    spec = {
        "duration": 180,
        "clients": [
            {"id": "a", "arrival": "uniform", "rate": 2, "input_len": 20, "output_len": 5},
            {"id": "b", "arrival": "uniform", "rate": 0.5, "input_len": 20, "output_len": 5},
        ],
    }
    w = workload_from_spec(spec)
    # a sends at 0, 0.5, 1, ...: the first 60 of each minute fill the (t - 60, t] window
    # by t = 29.5; the next 60 (t in [30, 60)) are over; at t = 60 the window has let
    # t = 0 go, and so on. b sends 30 a minute and is never over.
    over = {a.time for a in w.arrivals if a.client_id == "a" and int(a.time // 30) % 2 == 1}
    assert len(over) == 180
    for cluster in (ClusterSpec(), ClusterSpec(kind="disagg")):
        result = simulate(w, cluster, "rpm", fairness=FairnessConfig(rpm_limit=60))
        assert {r.client_id for r in result.rejected} == {"a"}
        assert {r.arrival_time for r in result.rejected} == over
        assert len(result.rejected) == 180
        assert len(result.requests) == 360 + 90 - 180


# -- disaggregated fairness ----------------------------------------------------------

OPPOSITE = {
    "duration": 120,
    "seed": 0,
    "clients": [
        {"id": "a", "arrival": "poisson", "rate": 12, "input_len": 512, "output_len": 32},
        {"id": "b", "arrival": "poisson", "rate": 12, "input_len": 32, "output_len": 512},
    ],
}


def imbalance(result: SimResult) -> float:
    s = client_service(result)
    return abs(s["a"] - s["b"]) / max(s.values())


def test_two_stage_vtc_is_fairer_than_per_stage_on_opposite_mixes():
    w = workload_from_spec(OPPOSITE)
    latency = fitted(8000)
    per_stage = simulate(w, ClusterSpec(kind="disagg"), "per-stage-vtc", latency)
    two_stage = simulate(w, ClusterSpec(kind="disagg"), "two-stage-vtc", latency)
    # Per stage, a's prompts and b's outputs are each "fair" in their own pool, and
    # the merged service is far apart; merged counters bring it together.
    assert imbalance(per_stage) > 0.4
    assert imbalance(two_stage) < 0.15
    assert max_backlogged_difference(two_stage) < max_backlogged_difference(per_stage) / 4


def test_two_stage_vtc_with_stale_counters_still_converges_to_fair_shares():
    w = workload_from_spec(OPPOSITE)
    latency = fitted(8000)
    per_stage = simulate(w, ClusterSpec(kind="disagg"), "per-stage-vtc", latency)
    for interval in (1.0, 5.0):
        stale = simulate(
            w, ClusterSpec(kind="disagg", publish_interval=interval), "two-stage-vtc", latency
        )
        assert imbalance(stale) < 0.15
        assert max_backlogged_difference(stale) < max_backlogged_difference(per_stage) / 4


def test_prefill_stops_taking_work_when_its_kv_is_full_of_unpulled_requests(watched):
    # Prefill is fast and small; decode is slow: prefill memory is the buffer, and it
    # fills, and then requests wait in the prefill queue instead of overflowing it.
    prompt, capacity = 300, 1500
    slow_decode = LinearLatency(kv_capacity_tokens=3000, decode_base=0.5)
    w = workload([Arrival(0.1 * i, "a", prompt, 40) for i in range(200)], 60.0)
    sim = Simulator(
        w,
        ClusterSpec(kind="disagg"),
        policy="fcfs",
        latency=LinearLatency(kv_capacity_tokens=capacity),
        decode_latency=slow_decode,
    )
    steps = record_steps(sim)
    result = sim.run()
    prefill_node = sim.prefill_nodes[0]
    assert prefill_node.peak <= capacity
    held = [r for r in result.requests if r.first_token_time is not None and r.transfer_end is None]
    assert 0 < len(held) <= capacity // (prompt + 1)
    waiting = [r for r in result.requests if r.prefill_start is None]
    assert len(waiting) > 100  # the queue is at prefill, not in its memory
    busy = sum(e - s for i, s, e in steps if i == 0)
    assert busy < 0.1 * w.duration  # it prefilled only as fast as decode pulled


# -- determinism and scale -----------------------------------------------------------


def fingerprint(result: SimResult) -> list[tuple]:
    return [
        (r.seq_id, r.prefill_start, r.first_token_time, r.decode_start, r.finish_time, r.produced)
        for r in result.requests
    ] + [("rejected", r.seq_id) for r in result.rejected]


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_same_inputs_give_identical_results(config):
    policy, cluster = config
    w = workload_from_spec(MIXED)
    runs = [simulate(w, cluster, policy, LinearLatency(kv_capacity_tokens=2500)) for _ in range(2)]
    assert fingerprint(runs[0]) == fingerprint(runs[1])
    assert runs[0].log.events == runs[1].log.events
    assert summarize(runs[0]) == summarize(runs[1])


def test_a_run_of_thousands_of_requests_completes():
    spec = {
        "duration": 300,
        "seed": 1,
        "clients": [
            {
                "id": f"c{i}",
                "arrival": "poisson",
                "rate": 2,
                "input_len": {"dist": "lognormal", "median": 200, "sigma": 1.0, "max": 2048},
                "output_len": {"dist": "lognormal", "median": 250, "sigma": 0.8, "max": 2048},
            }
            for i in range(4)
        ],
    }
    w = workload_from_spec(spec)
    assert len(w.arrivals) > 2000
    for policy, cluster in (
        ("vtc", ClusterSpec(instances=2)),
        ("two-stage-vtc", ClusterSpec(kind="disagg", prefill=1, decode=2)),
    ):
        result = simulate(w, cluster, policy, fitted())
        check_conservation(w, result)
        assert summarize(result)["finished"] > 1000

"""The colocated scheduler, driven directly: ``Sequence`` objects, no model, and a fake
"sampler" that appends one token per scheduled sequence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.engine.block_allocator import BlockAllocator
from disagg.engine.scheduler import ScheduledBatch, Scheduler
from disagg.engine.sequence import Sequence, SequenceStatus, blocks_for_tokens
from disagg.sampling_params import SamplingParams
from disagg.scheduling import FCFS

TOKEN = 7  # what the fake sampler emits


def make_scheduler(
    num_blocks: int,
    *,
    block_size: int = 4,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 10_000,
) -> Scheduler:
    return Scheduler(
        BlockAllocator(num_blocks),
        FCFS(),
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )


def make_seq(
    seq_id: int, prompt_len: int, max_tokens: int = 4, arrival: float | None = None
) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        prompt_token_ids=[1] * prompt_len,
        params=SamplingParams(max_tokens=max_tokens),
        arrival_time=float(seq_id) if arrival is None else arrival,
    )


def priority(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


def run_batch(sched: Scheduler, batch: ScheduledBatch) -> list[Sequence]:
    """What the engine's postprocess does: one token each, finish at max_tokens."""
    finished = []
    for seq in batch.seqs:
        seq.output_token_ids.append(TOKEN)
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            sched.finish(seq)
            finished.append(seq)
    return finished


def check_memory(sched: Scheduler) -> None:
    """Running sequences own disjoint blocks, waiting ones own none, and the allocator
    counts exactly what they hold."""
    sched.allocator.check_integrity()
    owned = [b for s in sched.running for b in s.block_table]
    assert len(owned) == len(set(owned)), "two running sequences share a block"
    assert sched.allocator.num_free == sched.allocator.num_blocks - len(owned)


# --- prefill ------------------------------------------------------------------------------


def test_prefill_respects_the_token_budget_and_admits_in_arrival_order() -> None:
    sched = make_scheduler(100, max_num_batched_tokens=20)
    seqs = [make_seq(i, n) for i, n in enumerate([8, 8, 8, 3, 30])]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert first is not None and first.is_prefill
    assert first.seqs == seqs[:2]  # 8 + 8 fit; 8 more would be 24 > 20
    second = sched.schedule()
    assert second.seqs == seqs[2:4]  # 8 + 3; seq 4 (30 tokens) does not fit with them
    # A prompt over the budget still goes, alone (the engine sizes the budget so that
    # any prompt it accepts fits; the scheduler must not starve it).
    third = sched.schedule()
    assert third.seqs == [seqs[4]]
    for s in seqs:
        assert len(s.block_table) == blocks_for_tokens(s.num_tokens, 4)
        assert s.status is SequenceStatus.RUNNING
    check_memory(sched)


def test_prefill_respects_max_num_seqs() -> None:
    sched = make_scheduler(100, max_num_seqs=3)
    seqs = [make_seq(i, 2) for i in range(5)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().seqs == seqs[:3]
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == seqs[:3]  # nothing more admitted
    seqs[1].output_token_ids.append(TOKEN)
    sched.finish(seqs[1])
    assert sched.schedule().seqs == [seqs[3]]  # one slot came free


def test_the_head_blocks_the_queue_when_it_does_not_fit() -> None:
    # 6 blocks of 4: A takes 3, then 4. B (16 tokens = 4 blocks) cannot fit beside it, and
    # C (1 block) could, but must not overtake B.
    sched = make_scheduler(6)
    a, b, c = make_seq(0, 12, max_tokens=2), make_seq(1, 16), make_seq(2, 4)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a]
    run_batch(sched, batch)
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a]
    assert b.status is c.status is SequenceStatus.WAITING
    run_batch(sched, batch)  # a finishes, its 3 blocks free
    assert a.is_finished
    assert sched.schedule().seqs == [b, c]


# --- preemption ---------------------------------------------------------------------------


def test_decode_preempts_the_latest_arrival_and_it_returns_ahead_of_later_ones() -> None:
    # 4 blocks of 2 tokens. A and B (4-token prompts) take 2 blocks apiece; C waits.
    sched = make_scheduler(4, block_size=2)
    a, b, c = make_seq(0, 4, max_tokens=3), make_seq(1, 4, max_tokens=3), make_seq(2, 1)
    for s in (a, b):
        sched.add(s)
    run_batch(sched, sched.schedule())  # prefill a, b: 5 tokens each now
    sched.add(c)
    # c needs 1 block, none is free: no prefill. Decode: a and b both need a 3rd block.
    batch = sched.schedule()
    assert not batch.is_prefill
    assert batch.seqs == [a] and batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_preemptions == 1
    assert sched.num_preemptions == 1
    assert sched.running == [a]
    check_memory(sched)
    run_batch(sched, batch)

    # b arrived before c, so it is readmitted first, with every token it has.
    while (batch := sched.schedule()) is not None and not batch.is_prefill:
        assert batch.seqs == [a]
        run_batch(sched, batch)
    assert a.is_finished
    assert batch is not None and batch.seqs == [b, c]
    assert b.num_tokens == 4 + 1  # prompt + the token sampled before preemption
    assert len(b.block_table) == blocks_for_tokens(b.num_tokens, 2)
    check_memory(sched)


def test_victim_is_the_latest_arrival_even_when_it_was_admitted_first() -> None:
    # Admission order and arrival order differ (a request that arrived earlier was added
    # later, as ``add_request(arrival_time=...)`` allows, or a policy admits out of arrival
    # order). The victim must still be the latest arrival among *all* running sequences,
    # including one already given its slot this step.
    sched = make_scheduler(4, block_size=2)
    late = make_seq(0, 3, max_tokens=8, arrival=10.0)  # 2 blocks, room for one more token
    sched.add(late)
    run_batch(sched, sched.schedule())
    early = make_seq(1, 4, max_tokens=8, arrival=1.0)  # 2 blocks, full after its prefill
    sched.add(early)
    run_batch(sched, sched.schedule())
    assert sched.running == [late, early] and sched.allocator.num_free == 0
    batch = sched.schedule()  # late fits in its blocks; early needs a 3rd, none is free
    assert batch.preempted == [late]
    assert batch.seqs == [early]
    assert len(early.block_table) == 3
    check_memory(sched)


# --- random workloads ---------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[int, int, int, int]]]:
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(1, 8))
    # (prompt_len, max_tokens, step it is added at, arrival time). The arrival time is
    # drawn apart from the step: add_request(arrival_time=...) lets a caller (a router)
    # hand over a request that arrived before ones already running.
    reqs = [
        (
            draw(st.integers(1, 40)),
            draw(st.integers(1, 12)),
            draw(st.integers(0, 6)),
            draw(st.integers(0, 20)),
        )
        for _ in range(n)
    ]
    longest = max(blocks_for_tokens(p + m, block_size) for p, m, _, _ in reqs)
    num_blocks = draw(st.integers(longest, longest + 8))
    max_num_seqs = draw(st.integers(1, 6))
    budget = draw(st.integers(1, 64))
    return block_size, num_blocks, max_num_seqs, budget, reqs


@settings(max_examples=200, deadline=None)
@given(workloads())
def test_random_workloads_finish_and_keep_every_invariant(workload) -> None:
    block_size, num_blocks, max_num_seqs, budget, reqs = workload
    sched = make_scheduler(
        num_blocks, block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget
    )
    seqs = [make_seq(i, p, m, arrival=float(t)) for i, (p, m, _, t) in enumerate(reqs)]
    pending = sorted(seqs, key=lambda s: (reqs[s.seq_id][2], s.seq_id))
    outputs_at_preemption: dict[int, int] = {}
    # Every step makes at least one token and no token is ever taken back, so the total
    # number of tokens bounds the number of steps; more would mean a livelock.
    max_steps = sum(m for _, m, _, _ in reqs) + len(reqs) + 10
    step = 0
    while pending or sched.has_unfinished():
        assert step <= max_steps, "no progress: livelock"
        while pending and reqs[pending[0].seq_id][2] <= step:
            sched.add(pending.pop(0))
        step += 1
        batch = sched.schedule()
        if batch is None:
            assert pending and not sched.has_unfinished(), "idle with work queued"
            continue
        assert batch.seqs, "a scheduled batch must make progress"
        assert len(sched.running) <= max_num_seqs
        if batch.is_prefill:
            assert len(batch.seqs) == 1 or sum(s.num_tokens for s in batch.seqs) <= budget
            prios = [priority(s) for s in batch.seqs]
            assert prios == sorted(prios), "admission out of arrival order"
            head = sched.policy.peek()
            if head is not None:
                assert priority(head) > prios[-1], "a later arrival overtook the head"
            for s in batch.seqs:
                assert len(s.block_table) == blocks_for_tokens(s.num_tokens, block_size)
                # A re-prefill recomputes the prompt and every output made before.
                assert len(s.output_token_ids) == outputs_at_preemption.pop(s.seq_id, 0)
        else:
            for s in batch.seqs:
                assert len(s.block_table) * block_size >= s.num_tokens
            for victim in batch.preempted:
                assert victim.block_table == [] and victim.status is SequenceStatus.WAITING
                assert all(priority(s) < priority(victim) for s in batch.seqs), (
                    "preempted an earlier arrival while a later one kept running"
                )
                outputs_at_preemption[victim.seq_id] = len(victim.output_token_ids)
        check_memory(sched)
        run_batch(sched, batch)
        check_memory(sched)

    for s, (p, m, _, _) in zip(seqs, reqs, strict=True):
        assert s.is_finished and s.num_tokens == p + m and s.block_table == []
    assert sched.allocator.num_free == num_blocks
    sched.allocator.check_integrity()


def test_a_tiny_pool_forces_preemption_and_everyone_still_finishes() -> None:
    # Not left to chance: eight requests of one block each, growing to four blocks, in a
    # pool that holds one sequence at its longest.
    sched = make_scheduler(4, block_size=4)
    seqs = [make_seq(i, 4, max_tokens=12) for i in range(8)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch is not None and batch.seqs
        run_batch(sched, batch)
        steps += 1
        assert steps < 1000
    assert sched.num_preemptions > 0
    assert all(s.is_finished and len(s.output_token_ids) == 12 for s in seqs)
    assert sched.allocator.num_free == 4


@pytest.mark.parametrize("waiting", [True, False])
def test_finish_releases_blocks_of_running_and_waiting_sequences(waiting: bool) -> None:
    sched = make_scheduler(4, max_num_seqs=1)
    a, b = make_seq(0, 5), make_seq(1, 5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    target = b if waiting else a
    sched.finish(target)
    assert target.is_finished and target.block_table == []
    assert sched.has_unfinished()
    assert len(sched.policy) == (0 if waiting else 1)
    check_memory(sched)


def test_admission_beside_running_sequences_keeps_the_watermark_free():
    sched = Scheduler(
        BlockAllocator(10),
        FCFS(),
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=1000,
        watermark_blocks=3,
    )
    first, second = make_seq(0, 16), make_seq(1, 16)  # 4 blocks each
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    # first takes 4 of 10; second would leave 2 free, but 3 must stay free beside it.
    assert batch is not None and batch.seqs == [first]
    assert sched.allocator.num_free == 6


def test_watermark_never_blocks_a_lone_sequence_that_needs_the_whole_pool():
    sched = Scheduler(
        BlockAllocator(4),
        FCFS(),
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=1000,
        watermark_blocks=2,
    )
    seq = make_seq(0, 16)
    sched.add(seq)
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [seq] and sched.allocator.num_free == 0


def test_under_vtc_a_head_that_does_not_fit_is_not_overtaken():
    """The chosen client's head waits for memory; no other client's request jumps
    ahead, so admission order stays the policy's order (and VTC's bound holds)."""
    from disagg.scheduling import make_policy

    sched = Scheduler(
        BlockAllocator(8),
        make_policy("vtc"),
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=1000,
    )
    running = make_seq(0, 16)  # 4 blocks
    running.client_id = "a"
    sched.add(running)
    assert sched.schedule().seqs == [running]
    big = make_seq(1, 20, arrival=1.0)  # needs 5 blocks: does not fit beside `running`
    big.client_id = "b"  # b has the smallest counter (0), so its head is chosen
    small = make_seq(2, 4, arrival=2.0)  # 1 block: would fit
    small.client_id = "a"
    sched.add(big)
    sched.add(small)
    batch = sched.schedule()
    assert batch is not None and not batch.is_prefill  # decode only: big waits, small too
    assert sched.policy.peek() is big

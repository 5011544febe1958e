"""Both node kinds admit by the shared rule with all their limits: in merged-counter
order, a head that does not fit blocks, the sequence cap holds, and the decode node's
preemption victim is the most-served client's request (a real tiny worker; the link and
transfers are stand-ins)."""

from __future__ import annotations

from decode_node.node import DecodeNode
from disagg.engine.worker import ModelWorker
from disagg.node.settings import NodeSettings
from disagg.protocol.cluster import DecodeTask, PrefillTask, PullRequest
from disagg.protocol.messages import Sampling
from prefill_node.node import PrefillNode
from tests.runtime.test_decode_node import RecordingLink, RecordingTransfers

BLOCK = 16


def node(cls, role: str, **settings):
    s = NodeSettings(
        role=role, node_id=f"{role}-0", coordinator="tcp://127.0.0.1:1", store="127.0.0.1:1",
        threads=1, block_size=BLOCK, **settings,
    )  # fmt: skip
    return cls(s, ModelWorker(s.engine_config()), RecordingLink(), RecordingTransfers())


def prefill_task(rid: int, tokens: int, client: str = "alice", counter: float = 0.0):
    return PrefillTask(
        task=rid, rid=rid, client_id=client, prompt_token_ids=[5] * tokens,
        sampling=Sampling(max_tokens=4, temperature=0), counter=counter, arrival=float(rid),
    )  # fmt: skip


def decode_task(rid: int, tokens: int, client: str = "alice", counter: float = 0.0):
    return DecodeTask(
        task=rid, rid=rid, client_id=client, prompt_token_ids=[5] * tokens,
        output_token_ids=[7], sampling=Sampling(max_tokens=64, temperature=0),
        counter=counter, arrival=float(rid), source="prefill-0@0a",
    )  # fmt: skip


def test_prefill_batch_keeps_the_sequence_cap():
    """The prefill node took every prompt that fitted its budget and blocks, however
    many; it now keeps ``max_num_seqs`` as the engine and the simulator do."""
    p = node(PrefillNode, "prefill", num_blocks=64, max_num_seqs=2)
    for rid in range(3):
        p.handle(prefill_task(rid, 8))
    assert [s.seq_id for s in p.prepare_step()] == [0, 1]
    assert [s.seq_id for s in p.prepare_step()] == [2]


def test_prefill_head_that_does_not_fit_blocks_smaller_ones_behind_it():
    p = node(PrefillNode, "prefill", num_blocks=4)  # 64 tokens of KV
    p.handle(prefill_task(1, 100, client="big", counter=0.0))  # 7 blocks: more than the pool
    p.handle(prefill_task(2, 8, client="small", counter=5.0))
    assert not p.has_work() and p.prepare_step() is None
    p.publish({"big": 10.0})  # the big client is now the more served: small goes first
    assert p.has_work() and [s.seq_id for s in p.prepare_step()] == [2]


def test_prefill_batch_keeps_the_token_budget_but_a_long_prompt_runs_alone():
    p = node(PrefillNode, "prefill", num_blocks=64, max_batch_tokens=40)
    for rid, n in [(0, 50), (1, 20), (2, 20), (3, 20)]:
        p.handle(prefill_task(rid, n))
    assert [s.seq_id for s in p.prepare_step()] == [0]
    assert [s.seq_id for s in p.prepare_step()] == [1, 2]


def test_decode_admission_is_in_counter_order_under_the_cap_and_watermark():
    d = node(DecodeNode, "decode", num_blocks=200, max_num_seqs=2)
    assert d.watermark == 2
    d.handle(decode_task(1, 40, client="heavy", counter=9.0))
    d.handle(decode_task(2, 40, client="light", counter=1.0))
    d.handle(decode_task(3, 40, client="light", counter=1.0))
    d.between_steps()
    assert d.link.sent[-1] == PullRequest(rids=[2, 3])  # the cap: heavy's waits
    assert d.waiting.peek().rid == 1


def test_decode_head_that_does_not_fit_beside_others_blocks():
    d = node(DecodeNode, "decode", num_blocks=100)  # watermark 1
    d.handle(decode_task(1, 16 * 90, counter=0.0))  # 91 blocks
    d.between_steps()
    assert 1 in d.pulling
    d.handle(decode_task(2, 16 * 8, client="b", counter=0.0))  # 9 blocks: 9 free, but
    d.handle(decode_task(3, 8, client="c", counter=1.0))  # the watermark; and no overtaking
    d.between_steps()
    assert set(d.pulling) == {1} and len(d.waiting) == 2


def test_decode_preemption_victim_is_the_most_served_clients_latest_request():
    d = node(DecodeNode, "decode", num_blocks=10)  # watermark 0
    # Three requests of 48 tokens (3 full blocks each): 9 blocks taken, 1 free.
    for rid, client, counter in [(1, "a", 5.0), (2, "b", 1.0), (3, "a", 5.0)]:
        d.handle(decode_task(rid, 47, client=client, counter=counter))
    d.between_steps()
    for rid in sorted(d.pulling):  # as if each KV had arrived and a step had run
        d.running[rid] = d.pulling.pop(rid)
        d.running[rid].seq.output_token_ids.append(7)  # 49 tokens: a 4th block each
    assert d.worker.allocator.num_free == 1
    assert d.waiting.preemption_victim(list(d.running.values())).rid == 3  # a's latest
    d.publish({"b": 8.0})  # now b is the most served
    step = d.prepare_step()
    # 1 gets the free block; 2 needs one and is itself the victim; its 3 blocks let 3 go on.
    assert step.preempted == [2] and [x.rid for x in step.items] == [1, 3]
    assert 2 in d.waiting and d.waiting.get(2).seq.block_table == []


def test_a_seeded_resume_goes_on_with_the_offline_stream():
    """A decode task resumed after 3 streamed tokens (recomputed here) samples the next
    ones as the offline engine did: its generator is advanced past the earlier draws."""
    from disagg import LLM, SamplingParams
    from disagg.protocol.cluster import StepTokens

    prompt = list(range(10, 30))
    params = SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    ref = LLM("tiny", num_blocks=64).generate([prompt], params)[0].token_ids
    d = node(DecodeNode, "decode", num_blocks=64)
    d.handle(DecodeTask(
        task=1, rid=1, client_id="a", prompt_token_ids=prompt, output_token_ids=ref[:3],
        sampling=Sampling.from_params(params), counter=0.0, arrival=0.0, source=None,
    ))  # fmt: skip
    d.between_steps()
    streamed: list[int] = []
    while (step := d.prepare_step()) is not None:
        d.finish_step(step, d.execute(step))
        for msg in d.link.sent:
            if isinstance(msg, StepTokens):
                streamed += msg.tokens
        d.link.sent.clear()
    assert streamed == ref[3:]

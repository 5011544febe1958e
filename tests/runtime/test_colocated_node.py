"""The colocated node driven message by message: a real tiny worker, the coordinator link
a stand-in that records what the node sends, steps run in the test's thread in the order
the node's loop runs them (prepare on the main thread, execute, finish)."""

from __future__ import annotations

from dataclasses import dataclass, field

from colocated_node.node import ColocatedNode
from disagg import LLM, SamplingParams
from disagg.engine.worker import ModelWorker
from disagg.node.settings import NodeSettings
from disagg.protocol.cluster import Admitted, Counters, DecodeTask, Release, StepTokens
from disagg.protocol.messages import Sampling

PROMPTS = [list(range(3, 3 + n)) for n in (40, 9, 23, 31)]
MAX_TOKENS = 12


@dataclass
class RecordingLink:
    sent: list = field(default_factory=list)

    def watch(self, fd: int) -> None:
        pass

    def send(self, msg) -> None:
        self.sent.append(msg)


@dataclass
class NoTransfers:
    on_done: object = None
    failure: str | None = None


def colocated_node(num_blocks: int = 64, **settings) -> ColocatedNode:
    s = NodeSettings(
        role="colocated", node_id="colocated-0", coordinator="tcp://127.0.0.1:1",
        store="127.0.0.1:1", num_blocks=num_blocks, threads=1, **settings,
    )  # fmt: skip
    return ColocatedNode(s, ModelWorker(s.engine_config()), RecordingLink(), NoTransfers())


def task(rid: int, prompt: list[int], client: str = "alice", streamed=(), counter=0.0):
    return DecodeTask(
        task=rid, rid=rid, client_id=client, prompt_token_ids=prompt,
        output_token_ids=list(streamed), sampling=Sampling(max_tokens=MAX_TOKENS, temperature=0),
        counter=counter, arrival=float(rid),
    )  # fmt: skip


def step(node: ColocatedNode):
    """One turn of the node's loop; returns the batch run (None: nothing to run)."""
    batch = node.prepare_step()
    if batch is not None:
        node.finish_step(batch, node.execute(batch))
    return batch


def run_to_idle(node: ColocatedNode, limit: int = 500) -> None:
    for _ in range(limit):
        if step(node) is None and not node.has_work():
            return
    raise AssertionError("the node did not go idle")


def streams(sent) -> dict[int, list[int]]:
    """Each request's stream as the coordinator takes it: tokens only at the next index."""
    out: dict[int, list[int]] = {}
    for msg in sent:
        if isinstance(msg, StepTokens):
            for rid, index, token in zip(msg.rids, msg.indices, msg.tokens, strict=True):
                have = out.setdefault(rid, [])
                assert index == len(have), f"request {rid}: gap or repeat"
                have.append(token)
    return out


def offline(prompts) -> list[list[int]]:
    llm = LLM("tiny", num_blocks=64)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return [o.token_ids for o in llm.generate(prompts, params)]


def test_streams_equal_the_offline_engine_and_no_block_is_leaked():
    node = colocated_node()
    free = node.worker.allocator.num_free
    for rid, prompt in enumerate(PROMPTS):
        node.handle(task(rid, prompt, client=f"c{rid % 2}"))
    first = node.prepare_step()
    assert first is not None and first.prefill  # prefill before any decode
    assert [m for m in node.link.sent if isinstance(m, Admitted)] == [Admitted(rids=[0, 1, 2, 3])]
    node.finish_step(first, node.execute(first))
    run_to_idle(node)
    got = streams(node.link.sent)
    assert [got[rid] for rid in range(len(PROMPTS))] == offline(PROMPTS)
    assert node.worker.allocator.num_free == free and not node.running


def test_a_resumed_request_goes_on_from_the_next_index():
    """Resumed from the prompt and the tokens a dead node had streamed: the rest of the
    stream is what the offline engine produces after them."""
    want = offline([PROMPTS[0]])[0]
    node = colocated_node()
    node.handle(task(7, PROMPTS[0], streamed=want[:5]))
    run_to_idle(node)
    steps = [m for m in node.link.sent if isinstance(m, StepTokens)]
    assert steps[0].indices == [5]
    assert [t for m in steps for t in m.tokens] == want[5:]
    assert [e.finish_reason for m in steps for e in m.finished] == ["length"]


def test_admission_follows_the_merged_counters():
    """Room for one prompt at a time: the less-served client's request is admitted first,
    though it arrived last; a published counter reorders what waits."""
    node = colocated_node(num_blocks=8, max_num_seqs=1)
    node.handle(task(1, PROMPTS[0], client="heavy", counter=0.0))
    node.handle(task(2, PROMPTS[1], client="light", counter=0.0))
    node.publish(Counters(values={"heavy": 500.0}).values)
    run_to_idle(node)
    admitted = [m.rids for m in node.link.sent if isinstance(m, Admitted)]
    assert admitted == [[2], [1]]


def test_preempted_requests_are_recomputed_without_a_gap_and_match_offline():
    """Too few blocks for all to grow: the most-served client's running request is
    preempted, readmitted later, and its stream still equals the offline engine's."""
    node = colocated_node(num_blocks=9)
    free = node.worker.allocator.num_free
    node.handle(task(0, PROMPTS[0], client="heavy", counter=10.0))
    node.handle(task(1, PROMPTS[2], client="light"))
    node.handle(task(2, PROMPTS[3], client="heavy", counter=10.0))
    run_to_idle(node)
    preempted = [r for m in node.link.sent if isinstance(m, StepTokens) for r in m.preempted]
    assert preempted  # the test exercises preemption
    got = streams(node.link.sent)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    assert [got[rid] for rid in range(3)] == offline(prompts)
    assert node.worker.allocator.num_free == free


def test_a_release_during_a_step_frees_its_blocks_after_the_step():
    node = colocated_node()
    free = node.worker.allocator.num_free
    node.handle(task(3, PROMPTS[0]))
    node.handle(task(4, PROMPTS[1]))
    batch = node.prepare_step()
    node.handle(Release(rid=3))  # arrives while the step runs
    node.finish_step(batch, node.execute(batch))
    assert 3 not in node.running and 4 in node.running
    assert 3 not in streams(node.link.sent)
    node.handle(Release(rid=4))
    assert node.worker.allocator.num_free == free and not node.has_work()


def test_a_head_that_does_not_fit_is_no_work_and_is_not_overtaken():
    """A head larger than the free blocks waits (the loop does not spin on it), and the
    small request behind it is not taken first (the shared admission rule)."""
    node = colocated_node(num_blocks=4)  # 64 tokens of KV
    node.handle(task(1, list(range(3, 103))))  # 100 tokens: 7 blocks
    node.handle(task(2, PROMPTS[1]))
    assert not node.has_work() and node.prepare_step() is None
    assert not [m for m in node.link.sent if isinstance(m, Admitted)]

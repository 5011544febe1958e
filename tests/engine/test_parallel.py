"""Tensor- and pipeline-parallel engines (gloo ranks on CPU) equal transformers token
for token, with logits within the single-device tolerance, on checkpoints written by
transformers: a GQA Llama at tp = 2, and a Qwen2-style model (biases, tied
embeddings, one KV head replicated, three layers split unevenly) at tp = 2, pp = 2
and tp = 2 x pp = 2. Each group of rank processes is started once per layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagg import LLM, SamplingParams
from disagg.engine.parallel.leader import ParallelModelWorker
from disagg.errors import ConfigError
from tests.engine.hf_models import hf_greedy, hf_logits, make_hf_checkpoint
from tests.engine.parallel_models import MAX_NEW, make_qwen2_mqa, prompts

FLOAT32_TOLERANCE = 1e-5  # as tests/engine/test_hf_equivalence.py: relative to max |logit|
BLOCK_SIZE = 4
NUM_BLOCKS = 12  # too few for the four prompts' growth: the scheduler must preempt
SEED = 3

# (checkpoint, tp, pp) -> the KV part each rank holds: (layers, kv heads), global.
LAYOUTS = {
    ("llama", 2, 1): [(range(0, 2), range(0, 1)), (range(0, 2), range(1, 2))],
    ("qwen2-mqa", 2, 1): [(range(0, 3), range(0, 1)), (range(0, 3), range(0, 1))],
    ("qwen2-mqa", 1, 2): [(range(0, 2), range(0, 1)), (range(2, 3), range(0, 1))],
    ("qwen2-mqa", 2, 2): [
        (range(0, 2), range(0, 1)),
        (range(0, 2), range(0, 1)),
        (range(2, 3), range(0, 1)),
        (range(2, 3), range(0, 1)),
    ],
}
VOCAB = {"llama": 384, "qwen2-mqa": 383}

# Each layout starts its own rank processes (about 1.5 s of CPU each to import torch).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {
        "llama": make_hf_checkpoint("llama", root / "llama"),
        "qwen2-mqa": make_qwen2_mqa(root / "qwen2-mqa"),
    }


@pytest.fixture(scope="module")
def expected(checkpoints):
    return {
        name: [hf_greedy(path, p, MAX_NEW) for p in prompts(VOCAB[name])]
        for name, path in checkpoints.items()
    }


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=lambda k: f"{k[0]}-tp{k[1]}-pp{k[2]}")
def parallel(request, checkpoints):
    name, tp, pp = request.param
    with LLM(
        str(checkpoints[name]),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        block_size=BLOCK_SIZE,
        num_blocks=NUM_BLOCKS,
        seed=SEED,
    ) as llm:
        llm.engine.worker.decode_micro_batches = pp  # on CPU off by default; tested here
        pids = llm.engine.worker.group.pids
        yield request.param, llm
    # Leaving the with block stopped (and reaped) every rank.
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []


def test_greedy_matches_transformers_under_preemption(parallel, expected):
    (name, _, _), llm = parallel
    outs = llm.generate(prompts(VOCAB[name]), SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [o.token_ids for o in outs] == expected[name]
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.allocator.check_integrity()
    assert llm.engine.allocator.num_free == NUM_BLOCKS


def test_prefill_and_decode_logits_match_transformers(parallel, checkpoints):
    (name, _, _), llm = parallel
    engine = llm.engine
    worker = engine.worker
    assert isinstance(worker, ParallelModelWorker)
    prompt = prompts(VOCAB[name])[2]
    reference = hf_logits(checkpoints[name], [*prompt, 7], torch.float32)  # (T+1, V)
    scale = reference.abs().max()
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4))
    try:
        batch = engine.scheduler.schedule()
        assert batch is not None and batch.is_prefill
        prefill = worker.logits(batch.seqs, is_prefill=True)[0]
        assert prefill.shape == (VOCAB[name],)
        assert (prefill - reference[len(prompt) - 1]).abs().max() <= FLOAT32_TOLERANCE * scale
        seq.output_token_ids.append(7)  # both sides see the same next input
        batch = engine.scheduler.schedule()
        assert batch is not None and not batch.is_prefill
        decode = worker.logits(batch.seqs, is_prefill=False)[0]
        assert (decode - reference[len(prompt)]).abs().max() <= FLOAT32_TOLERANCE * scale
    finally:
        engine.abort(seq.seq_id)


def test_each_rank_holds_only_its_layers_and_kv_heads(parallel, checkpoints):
    key, llm = parallel
    worker = llm.engine.worker
    assert [(s.layers, s.kv_heads) for s in worker.kv_shards] == LAYOUTS[key]
    import transformers as tf

    full = tf.AutoModelForCausalLM.from_pretrained(checkpoints[key[0]]).num_parameters()
    for ready in worker.group.ready:
        # A rank's slice plus what it replicates (norms, a replicated KV head, the tied
        # head's copy on the last stage): at most 0.72 of these small models.
        assert ready.num_parameters < 0.75 * full


def test_seeded_sampling_equals_the_single_device_engine(parallel, checkpoints):
    """Sampling runs on the driver rank with each request's own seeded generator: the
    same tokens as one device, preemptions and decode micro-batches and all."""
    (name, tp, pp), llm = parallel
    if tp * pp < 4:
        pytest.skip("checked on the largest layout only, to keep the CPU cost down")
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=MAX_NEW, seed=11),
        SamplingParams(temperature=1.0, max_tokens=MAX_NEW, seed=2**40),
        SamplingParams(temperature=0.7, top_k=20, max_tokens=MAX_NEW, seed=5),
        SamplingParams(temperature=0, max_tokens=MAX_NEW),
    ]
    single = LLM(str(checkpoints[name]), block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, seed=SEED)
    want = single.generate(prompts(VOCAB[name]), params)
    # The earlier tests of this group were greedy: the driver's stream is still fresh.
    got = llm.generate(prompts(VOCAB[name]), params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tensor_parallel_size": 3}, "tensor_parallel_size"),  # 4 heads
        ({"tensor_parallel_size": 8}, "tensor_parallel_size"),  # 8 > 4 heads
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"pipeline_parallel_size": 4}, "pipeline_parallel_size"),  # 3 layers
        ({"pipeline_parallel_size": True}, "pipeline_parallel_size"),
        ({"tensor_parallel_size": 2, "device": "cuda"}, "device"),  # no CUDA here
    ],
)
def test_bad_layouts_are_refused_by_name_before_any_rank_starts(checkpoints, kwargs, field):
    if field == "device" and torch.cuda.is_available():
        pytest.skip("the machine has CUDA")
    with pytest.raises(ConfigError) as info:
        LLM(str(checkpoints["qwen2-mqa"]), **kwargs)
    assert info.value.field == field

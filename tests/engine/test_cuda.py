"""GPU paths: Triton kernels inside the engine and decode CUDA graphs. Skipped without
CUDA; run on a GPU machine with ``pytest -m cuda``."""

from __future__ import annotations

import pytest

from disagg import LLM, SamplingParams
from tests.engine.hf_models import hf_greedy, make_hf_checkpoint

pytestmark = pytest.mark.cuda

PROMPTS = [[5, 17, 99, 200], list(range(3, 40)), list(range(50, 120))]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def graphs_of(llm: LLM):
    return llm.engine.worker.runner.graphs


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_cuda_greedy_matches_transformers(llama, enforce_eager):
    # float32 attention runs tl.dot in IEEE precision: exact tokens against transformers.
    llm = LLM(str(llama), device="cuda", dtype="float32", enforce_eager=enforce_eager)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    assert [o.token_ids for o in outs] == [hf_greedy(llama, p, 20) for p in PROMPTS]
    graphs = graphs_of(llm)
    if enforce_eager:
        assert graphs is None
    else:  # decode steps were graph replays, not eager steps
        assert graphs is not None and graphs.replays > 0


def test_cuda_graphs_equal_eager_in_bfloat16(llama):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    eager_llm = LLM(str(llama), device="cuda", dtype="bfloat16", enforce_eager=True)
    eager = eager_llm.generate(PROMPTS, params)
    graph_llm = LLM(str(llama), device="cuda", dtype="bfloat16", max_num_seqs=20)
    graphs = graphs_of(graph_llm)
    assert graphs is not None and graphs.buckets[-1] == 20  # a bucket at max_num_seqs
    before = graphs.replays
    out = graph_llm.generate(PROMPTS, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in eager]
    assert graphs.replays - before == 31  # 32 tokens: 1 from prefill, 31 decode replays
    assert graphs_of(eager_llm) is None


def test_torch_kernels_on_cuda_decode_eagerly(llama, monkeypatch):
    """Their attention syncs the host, which capture forbids: no graphs, same tokens."""
    monkeypatch.setenv("DISAGG_KERNEL_BACKEND", "torch")
    llm = LLM(str(llama), device="cuda", dtype="float32")
    assert graphs_of(llm) is None
    outs = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8))
    assert outs[0].token_ids == hf_greedy(llama, PROMPTS[0], 8)

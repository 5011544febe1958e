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


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_cuda_greedy_matches_transformers(llama, enforce_eager):
    llm = LLM(str(llama), device="cuda", dtype="float32", enforce_eager=enforce_eager)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    assert [o.token_ids for o in outs] == [hf_greedy(llama, p, 20) for p in PROMPTS]


def test_cuda_graphs_equal_eager_in_bfloat16(llama):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    eager = LLM(str(llama), device="cuda", dtype="bfloat16", enforce_eager=True).generate(
        PROMPTS, params
    )
    graphs = LLM(str(llama), device="cuda", dtype="bfloat16").generate(PROMPTS, params)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]

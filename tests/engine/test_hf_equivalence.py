"""Greedy generation through ``LLM`` equals transformers' own ``generate``, token for
token, for every supported architecture; logits agree within a per-dtype tolerance."""

from __future__ import annotations

import random

import pytest
import torch

from disagg import LLM, SamplingParams
from disagg.engine.attention_metadata import AttentionMetadata
from tests.engine.hf_models import hf_greedy, hf_logits, make_hf_checkpoint

ARCHS = ["llama", "llama3-rope", "qwen2", "mistral"]
# Prompt lengths around the 16-token block: inside, at, and just past block boundaries.
PROMPT_LENS = [1, 5, 15, 16, 17, 33, 70]
MAX_NEW = 24


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    return request.param, make_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def expected(checkpoint):
    _, path = checkpoint
    return [hf_greedy(path, p, MAX_NEW) for p in _prompts(384)]


def test_greedy_batched_matches_transformers(checkpoint, expected):
    _, path = checkpoint
    llm = LLM(str(path), block_size=16)
    outs = llm.generate(_prompts(384), SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [o.token_ids for o in outs] == expected
    for o, exp in zip(outs, expected, strict=True):
        assert o.finish_reason == ("stop" if len(exp) < MAX_NEW or exp[-1] == 2 else "length")


def test_greedy_matches_transformers_under_preemption(checkpoint, expected):
    _, path = checkpoint
    # 14 blocks of 4 tokens cannot hold all sequences' growth: the scheduler must preempt
    # and recompute, and the tokens must not change.
    llm = LLM(str(path), block_size=4, num_blocks=30)
    outs = llm.generate(_prompts(384), SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    llm.engine.allocator.check_integrity()
    assert llm.engine.allocator.num_free == 30


def test_sharded_checkpoint_loads_identically(tmp_path):
    path = make_hf_checkpoint("llama", tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    prompt = _prompts(384)[4]
    out = LLM(str(path)).generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert out[0].token_ids == hf_greedy(path, prompt, MAX_NEW)


# Max |logit difference| against transformers in the same dtype, relative to the largest
# |logit|: float32 differs only by summation order; half precisions by rounding of
# intermediate activations (the two implementations fuse different steps).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_prefill_and_decode_logits_match_transformers(checkpoint, dtype):
    _, path = checkpoint
    dtype_name = str(dtype).removeprefix("torch.")
    llm = LLM(str(path), dtype=dtype_name, block_size=4)
    engine = llm.engine
    prompt = _prompts(384)[5]
    reference = hf_logits(path, [*prompt, 7], dtype)  # (T+1, V)
    scale = reference.abs().max()

    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4))
    batch = engine.scheduler.schedule()
    assert batch is not None and batch.is_prefill
    prefill_logits = engine.runner.prefill(batch.seqs)[0]
    assert (prefill_logits - reference[len(prompt) - 1]).abs().max() <= TOLERANCE[dtype] * scale

    seq.output_token_ids.append(7)  # force the next input so both sides see the same token
    batch = engine.scheduler.schedule()
    assert batch is not None and not batch.is_prefill
    decode_logits = engine.runner.decode(batch.seqs)[0]
    assert (decode_logits - reference[len(prompt)]).abs().max() <= TOLERANCE[dtype] * scale


def test_attention_metadata_is_packed_without_padding(checkpoint):
    """Prefill packs the batch: T equals the sum of prompt lengths."""
    _, path = checkpoint
    llm = LLM(str(path), block_size=16)
    engine = llm.engine
    seen: list[AttentionMetadata] = []
    original = engine.model.forward

    def spy(input_ids, positions, kv, meta):
        seen.append(meta)
        return original(input_ids, positions, kv, meta)

    engine.model.forward = spy  # type: ignore[method-assign]
    llm.generate(_prompts(384)[:4], SamplingParams(temperature=0, max_tokens=2))
    prefill = next(m for m in seen if m.is_prefill)
    assert prefill.cu_seqlens.tolist() == [0, 1, 6, 21, 37]
    assert prefill.slot_mapping.numel() == 37

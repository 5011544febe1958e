"""A Hugging Face checkpoint that transformers wrote (Qwen2: q/k/v biases, tied
embeddings; no tokenizer, so token-id prompts), served through coordinator, prefill
node, KV transfer and decode node: greedy output equals transformers' own generate."""

from __future__ import annotations

import asyncio

import pytest

from disagg.client import AsyncClient, InvalidRequest
from tests.engine.hf_models import hf_greedy, make_hf_checkpoint
from tests.runtime.conftest import start_cluster

PROMPTS = [[5, 9, 13, 2], list(range(3, 20)), [7] * 33, list(range(100, 160, 3))]


def test_served_qwen2_equals_transformers(tmp_path):
    model_dir = make_hf_checkpoint("qwen2", tmp_path / "qwen2")
    cluster = start_cluster(tmp_path, model=str(model_dir), num_blocks=64)

    async def run():
        async with AsyncClient(cluster.client_address, timeout=120) as client:
            done = await asyncio.gather(
                *(
                    client.generate(p, client_id=f"c{i % 2}", max_tokens=12, temperature=0)
                    for i, p in enumerate(PROMPTS)
                )
            )
            with pytest.raises(InvalidRequest, match="tokenizer"):
                await client.generate("text needs a tokenizer", client_id="c", max_tokens=2)
            return done

    try:
        done = asyncio.run(run())
    finally:
        cluster.stop(drain_timeout=5)
    for prompt, completion in zip(PROMPTS, done, strict=True):
        assert completion.token_ids == hf_greedy(model_dir, prompt, 12)
        assert completion.nodes.prefill == "prefill-0"

"""Checkpoints for the parallel-engine tests, written by transformers itself."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tests.engine.hf_models import COMMON

# Prompt lengths inside, at and past 4-token blocks; few tokens keep the CPU cost small.
PROMPT_LENS = [1, 5, 17, 33]
MAX_NEW = 12


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def make_qwen2_mqa(path: Path) -> Path:
    """Qwen2-style: q/k/v biases (made non-zero), tied embeddings, one KV head (MQA:
    replicated at tp = 2), three layers (an uneven pp = 2 split) and an odd vocabulary
    (the last tensor rank's vocabulary slice is padded)."""
    import transformers as tf

    torch.manual_seed(4321)
    cfg = tf.Qwen2Config(
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        **{**COMMON, "num_hidden_layers": 3, "vocab_size": 383},
    )
    model = tf.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.eval().save_pretrained(path)
    return path

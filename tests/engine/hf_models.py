"""Checkpoints written by Hugging Face ``transformers`` itself (random weights), so the
engine is checked against code no one here wrote."""

from __future__ import annotations

from pathlib import Path

import torch

# Large enough init that greedy argmax has clear winners (no near-ties to flip).
COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    max_position_embeddings=1024,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
)


def make_hf_checkpoint(kind: str, path: Path, *, max_shard_size: str | None = None) -> Path:
    import transformers as tf

    torch.manual_seed(1234)
    if kind == "llama":
        cfg = tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **COMMON)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "llama3-rope":
        cfg = tf.LlamaConfig(
            num_attention_heads=4,
            num_key_value_heads=1,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=50000.0,
            **COMMON,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **COMMON
        )
        model = tf.Qwen2ForCausalLM(cfg)
        # Random init leaves biases at zero; make them count.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.5)
    elif kind == "mistral":
        cfg = tf.MistralConfig(
            num_attention_heads=8, num_key_value_heads=2, sliding_window=4096, **COMMON
        )
        model = tf.MistralForCausalLM(cfg)
    else:
        raise ValueError(kind)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.eval().save_pretrained(path, **kwargs)
    return path


def hf_greedy(
    path: Path, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32
) -> list[int]:
    """transformers' own greedy generate for one prompt, cut after the first EOS."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    if eos in out:
        out = out[: out.index(eos) + 1]
    return out


def hf_logits(path: Path, tokens: list[int], dtype: torch.dtype) -> torch.Tensor:
    """(len(tokens), vocab) float32 logits of transformers' forward pass."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()

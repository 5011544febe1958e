"""Llama-family decoder-only transformer (Llama, Mistral, Qwen2) over a paged KV cache.

The model knows nothing about scheduling or serving: it maps packed tokens plus
:class:`AttentionMetadata` to hidden states, reading and writing the K/V blocks it is
given. q/k/v and gate/up projections are fused into one matmul each; the loader fills
the fused weights from the separate Hugging Face tensors (see ``FUSED_SHARDS``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from disagg.engine.attention_metadata import AttentionMetadata
from disagg.engine.model_config import ModelConfig
from disagg.engine.rope import RotaryEmbedding
from disagg_kernels import paged_decode_attention, prefill_attention, store_kvcache

KVLayer = tuple[
    torch.Tensor, torch.Tensor
]  # (k_cache, v_cache), each (blocks, block_size, H_kv, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before scaling, as the reference does, so
        # low-precision results agree with it.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.q_size
        self.kv_size = cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        kv: KVLayer,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, H_kv, D)
        v = v.contiguous().view(T, self.num_kv_heads, self.head_dim)
        q, k = rope(positions, q, k)
        k_cache, v_cache = kv
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_prefill:
            assert meta.cu_seqlens is not None
            out = prefill_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, self.scale)
        else:
            assert meta.block_tables is not None and meta.context_lens is not None
            out = paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale
            )
        return self.o_proj(out.reshape(T, self.q_size))  # (T, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        kv: KVLayer,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)


class CausalLM(nn.Module):
    """The decoder stack plus the output head. Parameter names follow Hugging Face's,
    except the fused projections named in ``FUSED_SHARDS``."""

    # Hugging Face tensor name fragment -> (our fused parameter fragment, shard index).
    FUSED_SHARDS: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Shares the embedding with the output head when the config says so. Call it
        again after ``to_empty``, which materialises the two as separate tensors."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def shard_sizes(self, fused: str) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            return [cfg.q_size, cfg.kv_size, cfg.kv_size]
        return [cfg.intermediate_size, cfg.intermediate_size]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_layers: list[KVLayer],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: (T,) -> hidden states (T, hidden)
        stack = self.model
        x = stack.embed_tokens(input_ids)
        for layer, kv in zip(stack.layers, kv_layers, strict=True):
            x = layer(x, positions, stack.rope, kv, meta)
        return stack.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (B, vocab)

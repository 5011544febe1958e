"""The model's shape and numerics, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from disagg.errors import CheckpointError, UnsupportedArchitectureError

# Architecture name -> whether q/k/v projections carry a bias regardless of config.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers, in the model dtype."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_size * itemsize

    @property
    def max_context(self) -> int:
        """Longest sequence computed exactly: a sliding window caps it, since the engine
        attends to the full context."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(
                str(path), "missing: a Hugging Face model directory needs config.json"
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(str(path), f"not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(str(path), "must hold a JSON object")
        try:
            return cls.from_dict(raw, source=str(path))
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
            # int("big"), int(None), a dict where a list belongs, zero heads...
            raise CheckpointError(str(path), f"a field has an invalid value ({exc})") from exc

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else str(raw.get("model_type", "<none>"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(arch, list(SUPPORTED_ARCHITECTURES))

        def need(key: str) -> Any:
            if key not in raw:
                raise CheckpointError(source, f"missing required field {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise CheckpointError(
                source,
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})",
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(source, f"hidden_act {act!r} is not supported (only 'silu')")

        rope_theta, rope_scaling = _parse_rope(raw, source)
        sliding = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding = None
        dtype_name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            qkv_bias=SUPPORTED_ARCHITECTURES[arch] or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            dtype=DTYPES.get(dtype_name, torch.float32),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _parse_rope(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    # Two spellings exist: transformers >= 5 writes ``rope_parameters`` (theta inside);
    # older configs (most published checkpoints) have ``rope_theta`` + ``rope_scaling``.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        try:
            return theta, RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as exc:
            raise CheckpointError(
                source, f"llama3 rope scaling is missing {exc.args[0]!r}"
            ) from exc
    raise CheckpointError(
        source, f"rope type {rope_type!r} is not supported (supported: 'default', 'llama3')"
    )

"""What the hardware and the models are: GPU specs, model shapes, and named presets.

The latency models in :mod:`disagg.sim.latency` consume these two dataclasses and
nothing else, so a planner can pair any model with any GPU. Every number below carries
the class of its source; ``docs/latency-model.md`` lists them with the doubts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disagg.errors import (
    ConfigError,
    DisaggError,
    UnsupportedArchitectureError,
)

if TYPE_CHECKING:
    from disagg.engine.model_config import ModelConfig

MiB = 1 << 20
GB = 1e9  # decimal, as vendors quote bandwidth
Gbit = 1e9 / 8

OPT_ARCHITECTURE = "OPTForCausalLM"


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU as the roofline sees it. Bandwidths are bytes/s in ONE direction."""

    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s (no 2:4 sparsity)
    hbm_bandwidth: float  # device-memory bytes/s
    memory_bytes: int  # memory CUDA reports (nvidia-smi "memory.total")
    intra_node_bandwidth: float  # NVLink/PCIe bytes/s per direction: what a ring all-reduce sees
    intra_node_latency: float  # seconds per ring step of an all-reduce (assumed, see docs)
    inter_node_bandwidth: float  # network bytes/s available to one GPU (assumed, see docs)

    def __post_init__(self) -> None:
        for field in ("peak_flops", "hbm_bandwidth", "memory_bytes", "intra_node_bandwidth"):
            if not getattr(self, field) > 0:
                raise ConfigError(f"gpu.{field}", f"must be > 0, got {getattr(self, field)!r}")
        for field in ("intra_node_latency", "inter_node_bandwidth"):
            if getattr(self, field) < 0:
                raise ConfigError(f"gpu.{field}", f"must be >= 0, got {getattr(self, field)!r}")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The parts of a decoder-only transformer that cost time and memory.

    Norms, biases and OPT's learned position table are left out: together they are
    under 0.2% of the parameters of every preset.
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool  # SwiGLU: gate, up and down matrices; OPT's ReLU MLP has two
    tie_word_embeddings: bool  # the LM head shares the embedding table
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for field in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "dtype_bytes",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{field}", f"must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "model.num_kv_heads",
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Matmul weights of one layer: q, k, v, o projections and the MLP."""
        h = self.hidden_size
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attention + mlp

    @property
    def embedding_params(self) -> int:
        """The token embedding plus the LM head (one table when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers (the same formula as ModelConfig's)."""
        return 2 * self.num_layers * self.kv_size * self.dtype_bytes

    @classmethod
    def from_model_config(cls, config: ModelConfig, name: str = "") -> ModelShape:
        """The shape of a model the engine can run (Llama, Mistral, Qwen2: gated MLP)."""
        itemsize = config.kv_bytes_per_token // (2 * config.num_layers * config.kv_size)
        return cls(
            name=name or config.architecture,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            vocab_size=config.vocab_size,
            gated_mlp=True,
            tie_word_embeddings=config.tie_word_embeddings,
            dtype_bytes=itemsize,
        )


# --- GPUs -----------------------------------------------------------------------------
# peak_flops: dense BF16 tensor-core throughput; datasheets print the 2:4-sparse figure
#   with an asterisk and the dense one is half of it.
# memory_bytes: nvidia-smi "memory.total" of the part (what the CUDA allocator can see),
#   slightly below the marketing capacity; figures as printed by nvidia-smi on each part.
# intra_node_bandwidth: per direction. NVIDIA quotes NVLink as the bidirectional total
#   (A100 600 GB/s, H100/H200 900 GB/s); a ring all-reduce sends and receives at once,
#   so each direction carries half. PCIe Gen4 x16: 64 GB/s bidirectional, 32 per direction.
# intra_node_latency: per ring step; an assumption of the order NCCL small-message
#   all-reduces show (tens of microseconds in all), not a measured or published number.
# inter_node_bandwidth: an assumption about the deployment, not a GPU property: the
#   network share of one GPU in the usual node for that part (see each entry).
_NVLINK_STEP_S = 5e-6
_PCIE_STEP_S = 10e-6

GPUS: dict[str, GpuSpec] = {
    "a100-80g": GpuSpec(
        name="a100-80g",  # A100 SXM4 80GB
        peak_flops=312e12,  # NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS (624 sparse)
        hbm_bandwidth=2039 * GB,  # NVIDIA A100 datasheet: 80GB SXM, 2,039 GB/s
        memory_bytes=81920 * MiB,  # nvidia-smi: "NVIDIA A100-SXM4-80GB, 81920 MiB"
        intra_node_bandwidth=300 * GB,  # NVLink 3: 600 GB/s datasheet total, 300 per direction
        intra_node_latency=_NVLINK_STEP_S,
        inter_node_bandwidth=200 * Gbit,  # DGX A100: one 200 Gb/s HDR InfiniBand NIC per GPU
    ),
    "h100-80g": GpuSpec(
        name="h100-80g",  # H100 SXM5 80GB
        peak_flops=989e12,  # NVIDIA H100 datasheet: BF16 tensor 1,979 TFLOPS sparse -> 989 dense
        hbm_bandwidth=3350 * GB,  # NVIDIA H100 datasheet: SXM 3.35 TB/s
        memory_bytes=81559 * MiB,  # nvidia-smi: "NVIDIA H100 80GB HBM3, 81559 MiB"
        intra_node_bandwidth=450 * GB,  # NVLink 4: 900 GB/s datasheet total, 450 per direction
        intra_node_latency=_NVLINK_STEP_S,
        inter_node_bandwidth=400 * Gbit,  # DGX H100: one 400 Gb/s ConnectX-7 NIC per GPU
    ),
    "h200": GpuSpec(
        name="h200",  # H200 SXM 141GB
        peak_flops=989e12,  # NVIDIA H200 datasheet: BF16 tensor 1,979 TFLOPS sparse -> 989 dense
        hbm_bandwidth=4800 * GB,  # NVIDIA H200 datasheet: 4.8 TB/s
        memory_bytes=143771 * MiB,  # nvidia-smi: "NVIDIA H200, 143771 MiB" (datasheet: 141 GB)
        intra_node_bandwidth=450 * GB,  # NVLink 4: 900 GB/s datasheet total, 450 per direction
        intra_node_latency=_NVLINK_STEP_S,
        inter_node_bandwidth=400 * Gbit,  # HGX H200 nodes: one 400 Gb/s NIC per GPU
    ),
    "a10g": GpuSpec(
        name="a10g",  # AWS's A10 variant (g5 instances); AWS publishes no tensor figure
        # Third-party spec tables (e.g. Baseten's A10 vs A10G comparison) give ~70 TFLOPS
        # BF16 dense, against 125 on NVIDIA's A10 datasheet; we take 70. Unverified.
        peak_flops=70e12,
        hbm_bandwidth=600 * GB,  # same GDDR6 as the A10 (NVIDIA A10 datasheet: 600 GB/s)
        memory_bytes=23028 * MiB,  # nvidia-smi: "NVIDIA A10G, 23028 MiB"
        intra_node_bandwidth=32 * GB,  # no NVLink: PCIe Gen4 x16, per direction
        intra_node_latency=_PCIE_STEP_S,
        inter_node_bandwidth=100 * Gbit / 8,  # g5.48xlarge: 100 Gb/s shared by 8 GPUs
    ),
    "l4": GpuSpec(
        name="l4",
        peak_flops=121e12,  # NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS sparse -> 121 dense
        hbm_bandwidth=300 * GB,  # NVIDIA L4 datasheet: 300 GB/s GDDR6
        memory_bytes=23034 * MiB,  # nvidia-smi: "NVIDIA L4, 23034 MiB"
        intra_node_bandwidth=32 * GB,  # NVIDIA L4 datasheet: PCIe Gen4 x16 64 GB/s total
        intra_node_latency=_PCIE_STEP_S,
        inter_node_bandwidth=100 * Gbit / 8,  # g6.48xlarge / g2-standard-96: 100 Gb/s, 8 GPUs
    ),
}


# --- Models ---------------------------------------------------------------------------
# From each model's published config.json on the Hugging Face hub; OPT-175B (never on
# the hub) from the OPT paper's Table 1 with the family's ffn = 4 * hidden and vocab.
# All served in 16-bit.
def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    # OPT: ffn_dim = 4 * hidden, head_dim = 128, vocab 50272, ReLU MLP, LM head tied.
    return ModelShape(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=50272,
        gated_mlp=False,
        tie_word_embeddings=True,
    )


def _llama(
    name: str, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int
) -> ModelShape:
    return ModelShape(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
        gated_mlp=True,
        tie_word_embeddings=False,
    )


MODELS: dict[str, ModelShape] = {
    # facebook/opt-13b, facebook/opt-66b
    "opt-13b": _opt("opt-13b", 40, 5120, 40),
    "opt-66b": _opt("opt-66b", 64, 9216, 72),
    # OPT paper (Zhang et al. 2022), Table 1
    "opt-175b": _opt("opt-175b", 96, 12288, 96),
    # meta-llama/Llama-2-7b-hf, meta-llama/Meta-Llama-3-8B, meta-llama/Meta-Llama-3-70B
    "llama-2-7b": _llama("llama-2-7b", 32, 4096, 11008, 32, 32, 32000),
    "llama-3-8b": _llama("llama-3-8b", 32, 4096, 14336, 32, 8, 128256),
    "llama-3-70b": _llama("llama-3-70b", 80, 8192, 28672, 64, 8, 128256),
}


def gpu(name: str) -> GpuSpec:
    """The named GPU preset; ConfigError lists the known names."""
    try:
        return GPUS[name]
    except KeyError:
        raise ConfigError("gpu", f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


def model_shape(name: str) -> ModelShape:
    """The named model preset; ConfigError lists the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError("model", f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def model_shape_from_config(
    config: str | Path | dict[str, Any], *, name: str = "", dtype_bytes: int | None = None
) -> ModelShape:
    """The shape of any Hugging Face ``config.json`` (a path, a model directory, or the
    parsed dict): OPT here, the Llama family through the engine's ModelConfig.

    ``dtype_bytes`` overrides the checkpoint's dtype (serve an fp32 checkpoint in bf16).
    """
    if isinstance(config, dict):
        raw, source = config, "config.json"
    else:
        raw, source = _read_config(Path(config))
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else str(raw.get("model_type", "<none>"))
    try:
        if arch == OPT_ARCHITECTURE or raw.get("model_type") == "opt":
            shape = _opt_from_dict(raw, name or str(raw.get("_name_or_path", "opt")))
        else:
            shape = _llama_family_from_dict(raw, name, source)
    except DisaggError:
        raise
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ConfigError(source, f"a field is missing or has an invalid value ({exc!r})") from exc
    if dtype_bytes is not None:
        shape = replace(shape, dtype_bytes=dtype_bytes)
    return shape


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(str(path), "no such file (want a Hugging Face config.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "must hold a JSON object")
    return raw, str(path)


def _opt_from_dict(raw: dict[str, Any], name: str) -> ModelShape:
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    return ModelShape(
        name=name,
        num_layers=int(raw["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(raw["ffn_dim"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=int(raw["vocab_size"]),
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        dtype_bytes=_DTYPE_BYTES.get(str(raw.get("torch_dtype", "float16")), 2),
    )


def _llama_family_from_dict(raw: dict[str, Any], name: str, source: str) -> ModelShape:
    # Imported here: ModelConfig pulls in torch, which the presets alone do not need.
    from disagg.engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig

    try:
        config = ModelConfig.from_dict(raw, source=source)
    except UnsupportedArchitectureError as exc:
        supported = [*SUPPORTED_ARCHITECTURES, OPT_ARCHITECTURE]
        raise UnsupportedArchitectureError(exc.architecture, supported) from None
    return ModelShape.from_model_config(config, name=name or str(raw.get("_name_or_path", "")))

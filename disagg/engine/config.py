"""Engine settings, validated when the engine is built."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from disagg.errors import ConfigError
from disagg.scheduling import FairnessConfig

DEFAULT_CPU_KV_MEMORY = 1 << 30  # 1 GiB: plenty for the tiny model, modest for a 1B one
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """``dtype="auto"`` takes the checkpoint's dtype on CUDA and float32 on CPU. The KV
    pool is ``num_blocks`` blocks if given, else ``kv_cache_memory`` bytes, else (CPU) 1
    GiB or (CUDA) what is left of ``gpu_memory_utilization`` of the GPU after the
    weights. ``policy`` orders waiting requests (fcfs, lcf, rpm, vtc), priced and
    weighted by ``fairness``. ``max_model_len`` defaults to the model's context (capped by its sliding
    window, if any) and is capped by the pool's size. ``tensor_parallel_size`` x
    ``pipeline_parallel_size`` > 1 runs the model on that many rank processes
    (docs/parallel.md); ``kv_cache_memory`` is then per rank."""

    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    policy: str = "fcfs"
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    seed: int = 0
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def __post_init__(self) -> None:
        # torch.device raises a bare RuntimeError on e.g. "cuda:x"; catch it here instead.
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError("device", f"must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                "dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "tensor_parallel_size",
            "pipeline_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("num_blocks", "kv_cache_memory", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(name, f"must be an integer >= 1 or None, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )

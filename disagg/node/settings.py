"""Command-line settings and process set-up common to prefill and decode nodes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import dataclass

import torch

from disagg.engine.config import DEFAULT_GPU_MEMORY_UTILIZATION, EngineConfig
from disagg.engine.worker import ModelWorker
from disagg.protocol.cluster import Register, Role

log = logging.getLogger(__name__)

CLUSTER_SECRET_ENV = "DISAGG_CLUSTER_SECRET"


@dataclass(frozen=True)
class NodeSettings:
    role: Role
    node_id: str
    coordinator: str  # the coordinator's node endpoint, tcp://host:port
    store: str  # the TCPStore KV transfer pairs form through, host:port
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # a shared GPU: a part
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_batch_tokens: int = 8192
    threads: int | None = None
    transfer_timeout: float = 30.0
    heartbeat_interval: float = 0.5
    coordinator_timeout: float = 15.0  # no message from the coordinator this long: exit
    checksums: bool = False
    seed: int = 0
    curve_server_key: str | None = None  # the coordinator's CurveZMQ public key file
    tensor_parallel_size: int = 1  # the node's model on tp x pp rank processes
    pipeline_parallel_size: int = 1

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        p.add_argument("--node-id", required=True)
        p.add_argument("--coordinator", required=True, help="node endpoint, tcp://host:port")
        p.add_argument("--store", required=True, help="KV transfer rendezvous, host:port")
        p.add_argument("--model", default="tiny")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--block-size", type=int, default=16)
        p.add_argument("--num-blocks", type=int, default=None)
        p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes")
        p.add_argument(
            "--gpu-memory-utilization",
            type=float,
            default=DEFAULT_GPU_MEMORY_UTILIZATION,
            help="fraction of the GPU this node may use (nodes sharing a GPU split it)",
        )
        p.add_argument("--max-model-len", type=int, default=None, help="tokens per request")
        p.add_argument("--max-num-seqs", type=int, default=256)
        p.add_argument("--max-batch-tokens", type=int, default=8192)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--transfer-timeout", type=float, default=30.0)
        p.add_argument("--heartbeat-interval", type=float, default=0.5)
        p.add_argument("--coordinator-timeout", type=float, default=15.0)
        p.add_argument("--checksums", action="store_true", help="debug: KV checksums")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--curve-server-key", default=None, help="coordinator's CurveZMQ key")
        p.add_argument(
            "--tensor-parallel-size", "--tp", type=int, default=1,
            help="ranks per pipeline stage (each layer's heads and MLP split across them)",
        )  # fmt: skip
        p.add_argument(
            "--pipeline-parallel-size", "--pp", type=int, default=1,
            help="pipeline stages (the layers split across them)",
        )  # fmt: skip

    @classmethod
    def from_args(cls, role: Role, args: argparse.Namespace) -> NodeSettings:
        fields = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
        return cls(role=role, **fields)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_batch_tokens,
            seed=self.seed,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
        )


def prepare_process(settings: NodeSettings) -> None:
    """Threads, logging, and SIGTERM as a clean stop (KeyboardInterrupt)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    logging.basicConfig(
        level=os.environ.get("DISAGG_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s {settings.node_id} %(levelname)s %(message)s",
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def registration(settings: NodeSettings, worker: ModelWorker, endpoint: str) -> Register:
    layout = worker.kv_layout
    return Register(
        node_id=settings.node_id,
        role=settings.role,
        endpoint=endpoint,
        secret=os.environ.get(CLUSTER_SECRET_ENV),
        model=layout.model,
        block_size=worker.block_size,
        capacity_tokens=worker.num_blocks * worker.block_size,
        max_model_len=worker.max_model_len,
        max_batch_tokens=settings.max_batch_tokens,
        pid=os.getpid(),
        kv=layout,
    )

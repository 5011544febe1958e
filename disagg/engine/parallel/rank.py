"""One rank of a ``tp x pp`` group: its shard of the model, its part of the KV cache,
and the loop that runs the leader's plans.

:class:`RankWorker` is the reusable part (a node's rank holds one); :func:`rank_main`
is the process: it joins the group's torch.distributed world (gloo on CPU, NCCL on
CUDA) through the leader's TCPStore, dies with its parent (``PR_SET_PDEATHSIG`` on
Linux, and the leader's pipe closing everywhere), and reports any exception to the
leader before exiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from disagg.engine.config import DEFAULT_CPU_KV_MEMORY, EngineConfig
from disagg.engine.kv_cache import KVCache, KVCacheSpec
from disagg.engine.model_config import ModelConfig
from disagg.engine.parallel.layers import TensorGroup
from disagg.engine.parallel.layout import ParallelLayout
from disagg.engine.parallel.loading import load_rank_model
from disagg.engine.parallel.plan import (
    AllocateKV,
    KVAllocated,
    KVShardInfo,
    RankFailure,
    RankKVService,
    RankReady,
    RankStats,
    ScheduledSeq,
    Shutdown,
    StatsQuery,
    StepPlan,
    StepResult,
)
from disagg.engine.runner import ModelRunner
from disagg.engine.sampler import sample
from disagg.errors import ConfigError
from disagg.sampling_params import SamplingParams

# How long a rank waits for the others at the rendezvous and in a collective. A dead
# peer is noticed by the leader (process sentinels) long before this.
DIST_TIMEOUT = timedelta(minutes=10)
_PR_SET_PDEATHSIG = 1
# Share of a GPU a rank leaves for activations when sizing its KV pool (not profiled).
CUDA_ACTIVATION_RESERVE = 0.1


@dataclass(frozen=True, slots=True)
class RankSpec:
    """Everything a rank process needs to start (sent once, at spawn)."""

    config: EngineConfig
    model_dir: str
    model_config: ModelConfig
    layout: ParallelLayout
    rank: int
    device: str
    dtype: torch.dtype
    max_model_len: int
    store_host: str
    store_port: int
    parent_pid: int
    kv_service: RankKVService | None = None  # a node's rank: moves KV with peer nodes


@dataclass(slots=True)
class RankSequence:
    """What the runner and the sampler read of a sequence, rebuilt from a plan entry."""

    seq_id: int
    token_ids: list[int]
    num_tokens: int
    block_table: list[int]
    last_token_id: int
    params: SamplingParams | None
    generator: torch.Generator | None


class RankWorker:
    def __init__(self, spec: RankSpec):
        self.spec = spec
        layout, cfg = spec.layout, spec.model_config
        self.shard = layout.shard(spec.rank, cfg)
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        store = dist.TCPStore(
            spec.store_host, spec.store_port, is_master=False, timeout=DIST_TIMEOUT
        )
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            store=store,
            rank=spec.rank,
            world_size=layout.world_size,
            timeout=DIST_TIMEOUT,
        )
        # Every rank creates every stage's group, in the same order (torch's rule).
        mine = None
        for stage in range(layout.pp):
            ranks = [layout.rank_of(stage, t) for t in range(layout.tp)]
            group = dist.new_group(ranks) if layout.tp > 1 else None
            if stage == self.shard.stage:
                mine = TensorGroup(group, ranks, spec.rank)
        assert mine is not None
        self.tensor_group = mine
        self.model = load_rank_model(
            spec.model_dir,
            cfg,
            self.shard,
            mine,
            device=self.device,
            dtype=spec.dtype,
            max_positions=spec.max_model_len,
        )
        self.kv_spec = KVCacheSpec(
            num_layers=len(self.shard.layers),
            num_kv_heads=len(self.shard.kv_heads),
            head_dim=cfg.head_dim,
            block_size=spec.config.block_size,
            dtype=spec.dtype,
            first_layer=self.shard.layers.start,
            first_kv_head=self.shard.kv_heads.start,
        )
        self.kv_cache: KVCache | None = None
        self.runner: ModelRunner | None = None
        # Sampling state lives on the driver: the engine's stream for unseeded rows and
        # each seeded sequence's own generator, kept across preemptions.
        self.generator = torch.Generator(self.device).manual_seed(spec.config.seed)
        self._sampling: dict[int, tuple[SamplingParams, torch.Generator | None]] = {}

    def ready(self) -> RankReady:
        params = list(self.model.parameters())
        s = self.shard
        return RankReady(
            rank=s.rank,
            kv=KVShardInfo(s.rank, s.stage, s.tp_rank, self.kv_spec.layers, self.kv_spec.kv_heads),
            num_parameters=sum(p.numel() for p in params),
            parameter_bytes=sum(p.numel() * p.element_size() for p in params),
            max_blocks=self._max_blocks(),
        )

    def allocate(self, num_blocks: int) -> None:
        self.kv_cache = KVCache(self.kv_spec, num_blocks, self.device)
        # CUDA graphs would capture collectives and stage send/recv: eager for now.
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            max_num_seqs=self.spec.config.max_num_seqs,
            max_model_len=self.spec.max_model_len,
            use_cuda_graphs=False,
        )

    def execute(self, plan: StepPlan) -> StepResult:
        assert self.runner is not None, "a plan before the KV pool was allocated"
        for seq_id in plan.released:
            self._sampling.pop(seq_id, None)
        seqs = [self._sequence(s) for s in plan.seqs]
        # A RankSequence has every attribute the runner and the sampler read of a Sequence.
        run = self.runner.prefill if plan.is_prefill else self.runner.decode
        logits = run(seqs)  # type: ignore[arg-type]
        if not self.shard.is_driver:
            return StepResult(plan.step, self.shard.rank)
        if plan.return_logits:
            return StepResult.with_logits(plan.step, self.shard.rank, logits)
        tokens = sample(logits, seqs, self.generator)  # type: ignore[arg-type]
        return StepResult(plan.step, self.shard.rank, token_ids=tuple(tokens))

    def stats(self) -> RankStats:
        g = self.tensor_group
        return RankStats(self.shard.rank, g.reduce_seconds, g.reduce_calls)

    def _sequence(self, s: ScheduledSeq) -> RankSequence:
        params, generator = None, None
        if self.shard.is_driver:
            # A re-prefill after preemption sends the parameters again; the generator
            # carries on where it was, as it does in the single-device engine.
            if s.seq_id not in self._sampling:
                assert s.params is not None, f"sequence {s.seq_id} first named without parameters"
                gen = None
                if s.params.seed is not None:
                    gen = torch.Generator(self.device).manual_seed(s.params.seed)
                    if not s.params.greedy:  # the draws its earlier tokens took elsewhere
                        vocab = self.spec.model_config.vocab_size
                        for _ in range(s.skip_draws):
                            torch.empty(vocab, device=self.device).exponential_(1, generator=gen)
                self._sampling[s.seq_id] = (s.params, gen)
            params, generator = self._sampling[s.seq_id]
        return RankSequence(
            seq_id=s.seq_id,
            token_ids=list(s.token_ids),
            num_tokens=s.num_tokens,
            block_table=list(s.block_table),
            last_token_id=s.token_ids[-1],
            params=params,
            generator=generator,
        )

    def _max_blocks(self) -> int:
        cfg = self.spec.config
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory  # per rank
        elif self.device.type == "cpu":
            budget = DEFAULT_CPU_KV_MEMORY
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            # Activations are not profiled here (that would be a collective forward);
            # a share of the device is held back for them instead.
            reserve = CUDA_ACTIVATION_RESERVE
            budget = int(total * (cfg.gpu_memory_utilization - reserve)) - (total - free)
            if budget <= 0:
                raise ConfigError(
                    "gpu_memory_utilization",
                    f"{cfg.gpu_memory_utilization} of {self.device} leaves no room for the KV "
                    "cache after this rank's weights and other processes",
                )
        return self.kv_spec.blocks_for_budget(budget)


def rank_main(spec: RankSpec, conn: Connection, kv_conn: Connection | None = None) -> None:
    """The rank process. Every message from the leader gets one answer; an exception
    is sent as :class:`RankFailure` and ends the process with status 1. A node's rank
    also takes KV transfer commands on ``kv_conn`` once its pool exists."""
    _die_with_parent(spec.parent_pid)
    # Ctrl-C reaches the whole foreground process group: the leader decides when the
    # ranks stop (Shutdown, or its pipe closing).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.device == "cpu":
        # The group shares the machine's cores: oversubscribing them slows every rank.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.layout.world_size))
    code = 0
    try:
        worker = RankWorker(spec)
        conn.send(worker.ready())
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the leader is gone
                break
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, StepPlan):
                conn.send(worker.execute(msg))
            elif isinstance(msg, AllocateKV):
                worker.allocate(msg.num_blocks)
                if spec.kv_service is not None and kv_conn is not None:
                    from disagg.node.rank_transfers import serve_rank_kv  # a node's rank

                    assert worker.kv_cache is not None
                    serve_rank_kv(spec.kv_service, spec.rank, worker.kv_cache, kv_conn)
                conn.send(KVAllocated(spec.rank, msg.num_blocks))
            elif isinstance(msg, StatsQuery):
                conn.send(worker.stats())
            else:
                raise TypeError(f"unexpected message {type(msg).__name__} from the leader")
    except Exception as exc:  # reported to the leader, which raises RankFailedError
        code = 1
        with contextlib.suppress(BrokenPipeError, OSError):  # the leader may be gone too
            conn.send(RankFailure(spec.rank, type(exc).__name__, str(exc), traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies, even without a clean shutdown."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    """``python -m disagg.engine.parallel.rank FD [KV_FD]``: FD is this rank's end of
    the leader's pipe; the first message on it is the :class:`RankSpec`. KV_FD, for a
    node's rank, the pipe of KV transfer commands."""
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    kv_conn = Connection(int(args[1])) if len(args) > 1 else None
    rank_main(conn.recv(), conn, kv_conn)


if __name__ == "__main__":
    main()

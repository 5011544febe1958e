"""The leader of a rank group, seen by the engine as its worker.

:class:`ParallelModelWorker` keeps the request-facing half of :class:`ModelWorker`
(prompt checks, stop rules, output text, the block allocator) in the leader's process
and hands the model half — each scheduled batch — to a :class:`RankGroup` as a
:class:`StepPlan`. The leader holds no weights and no KV: the ranks do.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from disagg.engine.block_allocator import BlockAllocator
from disagg.engine.checkpoint import weight_files
from disagg.engine.config import EngineConfig
from disagg.engine.model_config import ModelConfig
from disagg.engine.parallel.group import RankGroup
from disagg.engine.parallel.layout import ParallelLayout
from disagg.engine.parallel.plan import KVShardInfo, RankKVService, ScheduledSeq, StepPlan
from disagg.engine.parallel.rank import RankSpec
from disagg.engine.sequence import Sequence
from disagg.engine.tokenizer import Tokenizer, eos_token_ids
from disagg.engine.worker import ModelWorker, resolve_model_dir
from disagg.errors import ConfigError

log = logging.getLogger(__name__)


class ParallelModelWorker(ModelWorker):
    """A :class:`ModelWorker` whose model runs on ``tp x pp`` rank processes.

    Only the request-facing methods of :class:`ModelWorker` are inherited, and they
    read only ``config``, ``model_config``, ``tokenizer``, ``eos_token_ids``,
    ``max_model_len`` and ``allocator``, all set here; ``model``, ``kv_cache`` and
    ``runner`` are None because they live in the ranks.
    """

    def __init__(self, config: EngineConfig, *, kv_service: RankKVService | None = None):
        """``kv_service``: the ranks of a node, which move KV with peer nodes (commands
        over ``group.kv_conns``)."""
        self.config = config
        self.layout = layout = ParallelLayout(
            config.tensor_parallel_size, config.pipeline_parallel_size
        )
        self.model_dir = resolve_model_dir(config.model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        layout.validate_for(self.model_config)
        weight_files(self.model_dir)  # a missing checkpoint fails here, typed, not in a rank
        self.device = torch.device(config.device)
        self.devices = _rank_devices(config.device, layout.world_size)
        self.dtype = self._resolve_dtype()
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        if self.tokenizer is None:
            log.warning(
                "%s has no tokenizer.json: only token-id prompts can be served", self.model_dir
            )
        self.eos_token_ids = eos_token_ids(self.model_dir, self.model_config.eos_token_ids)
        context = self.model_config.max_context
        max_len = config.max_model_len or context
        if max_len > context:
            raise ConfigError(
                "max_model_len", f"{max_len} exceeds the model's context of {context}"
            )
        if not config.enforce_eager and self.device.type == "cuda":
            log.info("tensor/pipeline-parallel decode runs eagerly (no CUDA graphs)")
        self.block_size = config.block_size
        if kv_service is not None:
            kv_service = dataclasses.replace(kv_service, layout=self.kv_layout)
        self.group = RankGroup(
            layout.world_size,
            lambda rank, host, port: RankSpec(
                config=config,
                model_dir=str(self.model_dir),
                model_config=self.model_config,
                layout=layout,
                rank=rank,
                device=self.devices[rank],
                dtype=self.dtype,
                max_model_len=max_len,
                store_host=host,
                store_port=port,
                parent_pid=os.getpid(),
                kv_service=kv_service,
            ),
            kv_pipes=kv_service is not None,
        )
        num_blocks = self.group.num_blocks
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.model = None
        self.kv_cache = None
        self.runner = None
        self._step = 0
        # Micro-batches overlap stages that have a device each (CUDA: one GPU per rank).
        # CPU ranks share the machine's cores, where bench/parallel.py measured them
        # no faster (tiny) to 1.4-1.6x slower (106 M parameters) on 2 shared cores: off.
        self.decode_micro_batches = layout.pp if self.device.type == "cuda" else 1
        # Sequences the driver keeps sampling state for (ids are unique per leader); a
        # finished one (stopped or aborted) is named in the next plan's ``released``.
        self._on_driver: dict[int, Sequence] = {}
        self._forgotten: list[int] = []  # named in the next plan's ``released``

    @property
    def kv_shards(self) -> list[KVShardInfo]:
        """Which layers and KV heads (global indices) each rank's pool holds."""
        return [r.kv for r in self.group.ready]

    def execute(
        self, seqs: list[Sequence], is_prefill: bool, generator: torch.Generator | None = None
    ) -> list[int]:
        """Runs one batch on the ranks; the driver rank samples (with its own stream
        seeded like the engine's, so ``generator`` is not used).

        With ``pp > 1`` a decode batch goes as up to ``decode_micro_batches``
        micro-batches, all sent before any answer is awaited: stage 0 starts the second
        while stage 1 runs the first, so the stages work at the same time (DistServe's
        reason to serve decode with pp). Greedy and seeded rows sample exactly as in one
        batch; unseeded rows draw from the driver's stream one micro-batch at a time."""
        chunks = [seqs]
        if not is_prefill and self.decode_micro_batches > 1 and len(seqs) > 1:
            n = min(self.decode_micro_batches, len(seqs))
            size = -(-len(seqs) // n)
            chunks = [seqs[i : i + size] for i in range(0, len(seqs), size)]
        plans = [self._plan(c, is_prefill, return_logits=False) for c in chunks]
        tokens: list[int] = []
        for result in self.group.run_many(plans):
            assert result.token_ids is not None
            tokens.extend(result.token_ids)
        return tokens

    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """(B, vocab) float32 logits of one batch, without sampling (tests, profiling)."""
        (result,) = self.group.run_many([self._plan(seqs, is_prefill, return_logits=True)])
        assert result.logits is not None
        return result.logits

    def forget(self, seq_id: int) -> None:
        """``seq_id`` will not be run again (a node finished or released it without the
        engine's finished status): the driver drops its sampling state at the next plan."""
        if self._on_driver.pop(seq_id, None) is not None:
            self._forgotten.append(seq_id)

    def close(self) -> None:
        self.group.close()

    def _plan(self, seqs: list[Sequence], is_prefill: bool, *, return_logits: bool) -> StepPlan:
        """A sequence's parameters go with every prefill and with the first plan that
        names it (a decode of a sequence prefilled elsewhere, e.g. a pulled one)."""
        self._step += 1
        entries = []
        for s in seqs:
            first = self._on_driver.get(s.seq_id) is not s  # the driver has not seen it
            entries.append(
                ScheduledSeq(
                    seq_id=s.seq_id,
                    token_ids=tuple(s.token_ids) if is_prefill else (s.last_token_id,),
                    num_tokens=s.num_tokens,
                    block_table=tuple(s.block_table),
                    params=s.params if is_prefill or first else None,
                    skip_draws=s.num_output_tokens if first else 0,
                )
            )
        finished = [i for i, s in self._on_driver.items() if s.is_finished]
        for i in finished:
            del self._on_driver[i]
        released = (*self._forgotten, *finished)
        self._forgotten = []
        self._on_driver.update((s.seq_id, s) for s in seqs)
        return StepPlan(self._step, is_prefill, tuple(entries), released, return_logits)


def _rank_devices(device: str, world_size: int) -> list[str]:
    """CPU: every rank on the CPU. CUDA: one GPU per rank, from ``cuda:N`` on."""
    if device == "cpu":
        return ["cpu"] * world_size
    if not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but torch sees no CUDA device")
    first = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if first + world_size > count:
        raise ConfigError(
            "tensor_parallel_size",
            f"tensor_parallel_size x pipeline_parallel_size = {world_size} ranks from "
            f"cuda:{first} need {first + world_size} GPUs; {count} visible",
        )
    return [f"cuda:{first + r}" for r in range(world_size)]

"""Which part of the model each rank of a ``tp x pp`` group holds.

Global rank ``r`` is stage ``r // tp``, tensor rank ``r % tp``. A stage holds a
contiguous run of layers (the first ``num_layers % pp`` stages one more, so uneven
splits work); inside a stage, tensor rank ``t`` holds query heads
``[t*H/tp, (t+1)*H/tp)``, the KV heads those query heads read, a ``1/tp`` slice of
the MLP's intermediate dimension and a ``ceil(V/tp)`` slice of the vocabulary.

KV heads: with ``tp <= H_kv`` each rank holds ``H_kv/tp`` of them; with fewer KV
heads than ranks (MQA/GQA) each KV head is **replicated** on ``tp/H_kv`` ranks, the
ones whose query heads share it, so every rank holds one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from disagg.engine.model_config import ModelConfig
from disagg.errors import ConfigError

TP_FIELD = "tensor_parallel_size"
PP_FIELD = "pipeline_parallel_size"


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name, value in ((TP_FIELD, self.tp), (PP_FIELD, self.pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def validate_for(self, cfg: ModelConfig) -> None:
        """Raises :class:`ConfigError` naming the setting the model cannot be split by."""
        tp, pp = self.tp, self.pp
        if cfg.num_heads % tp:
            raise ConfigError(
                TP_FIELD, f"{tp} does not divide the model's {cfg.num_heads} attention heads"
            )
        kv = cfg.num_kv_heads
        if kv % tp and tp % kv:
            raise ConfigError(
                TP_FIELD,
                f"{tp} and the model's {kv} KV heads must divide one another "
                "(split them, or replicate each on tp/KV ranks)",
            )
        if cfg.intermediate_size % tp:
            raise ConfigError(
                TP_FIELD,
                f"{tp} does not divide the model's MLP width {cfg.intermediate_size}",
            )
        if pp > cfg.num_layers:
            raise ConfigError(
                PP_FIELD,
                f"{pp} stages for the model's {cfg.num_layers} layers: at most one per layer",
            )

    def stage_layers(self, stage: int, num_layers: int) -> range:
        """Global indices of the layers stage ``stage`` holds (earlier stages take the
        remainder: the last stage also runs the LM head and sampling)."""
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))

    def tp_kv_heads(self, tp_rank: int, num_kv_heads: int) -> range:
        """Global indices of the KV heads tensor rank ``tp_rank`` holds (on every stage)."""
        tp = self.tp
        if tp <= num_kv_heads:
            per_rank = num_kv_heads // tp
            return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
        # Replicated: tp/kv consecutive ranks share one KV head.
        start = tp_rank // (tp // num_kv_heads)
        return range(start, start + 1)

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def shard(self, rank: int, cfg: ModelConfig) -> RankShard:
        assert 0 <= rank < self.world_size
        stage, t = divmod(rank, self.tp)
        tp = self.tp
        heads_per_rank = cfg.num_heads // tp
        inter = cfg.intermediate_size // tp
        vocab = -(-cfg.vocab_size // tp)
        return RankShard(
            layout=self,
            rank=rank,
            stage=stage,
            tp_rank=t,
            layers=self.stage_layers(stage, cfg.num_layers),
            q_heads=range(t * heads_per_rank, (t + 1) * heads_per_rank),
            kv_heads=self.tp_kv_heads(t, cfg.num_kv_heads),
            intermediate=range(t * inter, (t + 1) * inter),
            vocab=range(t * vocab, min((t + 1) * vocab, cfg.vocab_size)),
            vocab_padded=vocab,
        )


@dataclass(frozen=True, slots=True)
class RankShard:
    """One rank's part of the model, in global indices. ``vocab`` may be shorter than
    ``vocab_padded`` on the last tensor rank (rows past the vocabulary are zero)."""

    layout: ParallelLayout
    rank: int
    stage: int
    tp_rank: int
    layers: range
    q_heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    vocab_padded: int

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.pp - 1

    @property
    def is_driver(self) -> bool:
        """The rank that samples and answers the leader: tensor rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def stage_ranks(self) -> list[int]:
        return [self.layout.rank_of(self.stage, t) for t in range(self.layout.tp)]

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first_stage else self.layout.rank_of(self.stage - 1, self.tp_rank)

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last_stage else self.layout.rank_of(self.stage + 1, self.tp_rank)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of the model this rank builds: its heads, MLP slice and layers.
        (The vocabulary-parallel modules replace the embedding and head afterwards.)"""
        return dataclasses.replace(
            cfg,
            num_heads=len(self.q_heads),
            num_kv_heads=len(self.kv_heads),
            intermediate_size=len(self.intermediate),
            num_layers=len(self.layers),
            vocab_size=self.vocab_padded,
        )

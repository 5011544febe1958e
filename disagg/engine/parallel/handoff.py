"""Which KV a decode node's ranks receive from which prefill node's ranks.

A prefill node of layout ``(tp_p, pp_p)`` hands a request's KV to a decode node of
layout ``(tp_d, pp_d)``. Decode rank ``d`` needs exactly the layers and KV heads of its
own pool; :func:`plan_handoff` cuts that into **pieces** ``(src_rank, dst_rank, layers,
kv_heads)``, one per prefill rank it reads from, such that every (decode rank, layer,
KV head) its pool holds is covered by exactly one piece, read from a prefill rank whose
pool holds it. The ranges come from :class:`ParallelLayout` itself (``stage_layers``,
``tp_kv_heads``), so the plan follows the engine's rule by construction.

A replicated KV head (``tp > H_kv``) is held by several prefill ranks; each piece reads
it from one of them, the one with the least KV assigned so far (ties: lowest rank), so
the replicas share the sending. A decode node with replicated heads receives each head
once **per decode rank** holding it: every one of those ranks needs it in its own pool.

A (prefill rank, decode rank) pair carries at most one piece: a prefill rank holds one
contiguous run of layers and of KV heads, and so does a decode rank, and the
intersection of two such boxes is one box. So a pair channel moves one tensor per layer
run per request, and the pairs a plan uses are the channels a node pair needs.

:func:`check_compatible` is what the coordinator calls when nodes register: it refuses
by name a prefill/decode pair whose KV cannot be handed over, and accepts every pair of
layouts that can (any ``tp`` and ``pp`` on either side, as long as each side's layout is
one the model can take).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from disagg.engine.model_config import ModelConfig
from disagg.engine.parallel.layout import PP_FIELD, TP_FIELD, ParallelLayout
from disagg.errors import ConfigError

KVDtype = Literal["float32", "bfloat16", "float16"]
_DTYPE_NAMES: dict[torch.dtype, KVDtype] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
_TORCH_DTYPES: dict[KVDtype, torch.dtype] = {name: dt for dt, name in _DTYPE_NAMES.items()}


class KVNodeLayout(BaseModel):
    """What a node tells the coordinator about its KV pool when it registers: the model
    (its fingerprint), the KV shape every rank's pool is cut from, and the node's
    parallel layout. Plain values: it travels in the registration message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    block_size: int = Field(ge=1)
    dtype: KVDtype
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)

    @classmethod
    def of(
        cls,
        model: str,
        cfg: ModelConfig,
        block_size: int,
        dtype: torch.dtype,
        layout: ParallelLayout,
    ) -> KVNodeLayout:
        return cls(
            model=model,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            block_size=block_size,
            dtype=_DTYPE_NAMES[dtype],
            tp=layout.tp,
            pp=layout.pp,
        )

    @property
    def parallel(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    def rank_kv(self, rank: int) -> tuple[range, range]:
        """(layers, KV heads) rank ``rank``'s pool holds, in global indices: the ranges
        of ``ParallelLayout.shard(rank, cfg)`` for this node's model."""
        layout = self.parallel
        assert 0 <= rank < layout.world_size
        stage, t = divmod(rank, layout.tp)
        return layout.stage_layers(stage, self.num_layers), layout.tp_kv_heads(t, self.num_kv_heads)


class IncompatibleNodesError(ConfigError):
    """A prefill node and a decode node whose KV cannot be handed from one to the other;
    ``field`` names what differs (``model``, ``dtype``, ``block_size``, ``head_dim``,
    ``num_layers``, ``num_kv_heads``) or which node's layout the model cannot take
    (``tensor_parallel_size``, ``pipeline_parallel_size``; ``role`` says whose)."""

    def __init__(self, field: str, reason: str, role: str | None = None) -> None:
        super().__init__(field, reason if role is None else f"{role} node: {reason}")
        self.role = role


# Fields both nodes must agree on, in the order they are checked (the model first: a
# different model explains every other difference).
_MATCHED_FIELDS = ("model", "dtype", "block_size", "head_dim", "num_layers", "num_kv_heads")


def check_compatible(prefill: KVNodeLayout, decode: KVNodeLayout) -> None:
    """Raises :class:`IncompatibleNodesError` naming the first field that makes a hand-off
    from ``prefill`` to ``decode`` impossible; returns if any request's KV can be handed."""
    for name in _MATCHED_FIELDS:
        p, d = getattr(prefill, name), getattr(decode, name)
        if p != d:
            raise IncompatibleNodesError(
                name, f"prefill node has {p!r}, decode node has {d!r}; they must be equal"
            )
    for role, node in (("prefill", prefill), ("decode", decode)):
        kv, tp = node.num_kv_heads, node.tp
        if kv % tp and tp % kv:
            raise IncompatibleNodesError(
                TP_FIELD, f"{tp} and the model's {kv} KV heads must divide one another", role
            )
        if node.pp > node.num_layers:
            raise IncompatibleNodesError(
                PP_FIELD, f"{node.pp} stages for the model's {node.num_layers} layers", role
            )


@dataclass(frozen=True, slots=True)
class Piece:
    """KV of ``layers`` x ``kv_heads`` (global indices) that prefill rank ``src_rank``
    sends to decode rank ``dst_rank``: for each block of the request, K and V."""

    src_rank: int
    dst_rank: int
    layers: range
    kv_heads: range

    def nbytes(self, num_blocks: int, block_size: int, head_dim: int, itemsize: int) -> int:
        cells = len(self.layers) * len(self.kv_heads)
        return 2 * cells * num_blocks * block_size * head_dim * itemsize


@dataclass(frozen=True, slots=True)
class HandoffPlan:
    prefill: KVNodeLayout
    decode: KVNodeLayout
    pieces: tuple[Piece, ...]  # by decode rank, then layer, then KV head

    def to_rank(self, dst_rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.dst_rank == dst_rank]

    def from_rank(self, src_rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.src_rank == src_rank]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(prefill rank, decode rank) pairs that carry a piece: the channels needed."""
        return [(p.src_rank, p.dst_rank) for p in self.pieces]

    def nbytes(self, num_blocks: int) -> int:
        """Bytes a request of ``num_blocks`` blocks moves, over all pairs."""
        n = self.prefill
        itemsize = self.prefill.torch_dtype.itemsize
        return sum(p.nbytes(num_blocks, n.block_size, n.head_dim, itemsize) for p in self.pieces)


def plan_handoff(prefill: KVNodeLayout, decode: KVNodeLayout) -> HandoffPlan:
    """The pieces that hand a request's KV from ``prefill``'s ranks to ``decode``'s (see
    the module docstring). Raises :class:`IncompatibleNodesError` as
    :func:`check_compatible` does."""
    check_compatible(prefill, decode)
    src = prefill.parallel
    heads, num_layers = prefill.num_kv_heads, prefill.num_layers
    # Prefill tensor ranks grouped by the KV heads they hold: replicas share a range.
    holders: dict[range, list[int]] = {}
    for t in range(src.tp):
        holders.setdefault(src.tp_kv_heads(t, heads), []).append(t)
    load = [0] * src.world_size  # (layer, head) cells each prefill rank sends so far
    pieces: list[Piece] = []
    for dst in range(decode.parallel.world_size):
        dst_layers, dst_heads = decode.rank_kv(dst)
        for stage in range(src.pp):
            layers = _intersect(src.stage_layers(stage, num_layers), dst_layers)
            if not layers:
                continue
            for held, tp_ranks in holders.items():
                kv = _intersect(held, dst_heads)
                if not kv:
                    continue
                ranks = [src.rank_of(stage, t) for t in tp_ranks]
                chosen = min(ranks, key=lambda r: (load[r], r))
                load[chosen] += len(layers) * len(kv)
                pieces.append(Piece(chosen, dst, layers, kv))
    return HandoffPlan(prefill, decode, tuple(pieces))


def _intersect(a: range, b: range) -> range:
    assert a.step == 1 and b.step == 1
    return range(max(a.start, b.start), max(min(a.stop, b.stop), max(a.start, b.start)))

"""The hand-off plan between two parallel layouts, and the registration check: pure
arithmetic, no processes. Coverage is checked against ``ParallelLayout.shard`` of a real
model config (what each engine rank holds), not against the plan's own helpers."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.engine.model_config import ModelConfig
from disagg.engine.parallel.handoff import (
    IncompatibleNodesError,
    KVNodeLayout,
    Piece,
    check_compatible,
    plan_handoff,
)
from disagg.engine.parallel.layout import ParallelLayout
from disagg.engine.tiny_model import tiny_model_path

MODEL = "tiny@abc"


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return ModelConfig.from_dir(tiny_model_path())


def node(cfg: ModelConfig, tp: int = 1, pp: int = 1, **changes) -> KVNodeLayout:
    base = KVNodeLayout.of(MODEL, cfg, 4, torch.float32, ParallelLayout(tp=tp, pp=pp))
    return base.model_copy(update=changes)


def test_tp2_to_pp2_each_decode_stage_reads_its_layers_from_both_tensor_ranks(tiny):
    cfg = dataclasses.replace(tiny, num_layers=4, num_kv_heads=2)
    plan = plan_handoff(node(cfg, tp=2), node(cfg, pp=2))
    assert plan.pieces == (
        Piece(0, 0, range(0, 2), range(0, 1)),
        Piece(1, 0, range(0, 2), range(1, 2)),
        Piece(0, 1, range(2, 4), range(0, 1)),
        Piece(1, 1, range(2, 4), range(1, 2)),
    )


def test_uneven_stages_cut_pieces_at_both_sides_boundaries(tiny):
    cfg = dataclasses.replace(tiny, num_layers=5, num_kv_heads=2)
    plan = plan_handoff(node(cfg, pp=2), node(cfg, pp=3))  # 3+2 -> 2+2+1
    assert [(p.src_rank, p.dst_rank, p.layers) for p in plan.pieces] == [
        (0, 0, range(0, 2)),
        (0, 1, range(2, 3)),
        (1, 1, range(3, 4)),
        (1, 2, range(4, 5)),
    ]


def test_a_replicated_head_is_read_from_its_replicas_in_turn(tiny):
    cfg = dataclasses.replace(tiny, num_heads=8, num_kv_heads=1, num_layers=2)
    # Prefill tp4 holds the one KV head on all four ranks; decode tp4 needs it on each.
    plan = plan_handoff(node(cfg, tp=4), node(cfg, tp=4))
    assert sorted(p.src_rank for p in plan.pieces) == [0, 1, 2, 3]
    assert all(p.kv_heads == range(0, 1) and p.layers == range(0, 2) for p in plan.pieces)
    # Decode tp1 needs it once: one piece, not four.
    (only,) = plan_handoff(node(cfg, tp=4), node(cfg, tp=1)).pieces
    assert (only.dst_rank, only.layers, only.kv_heads) == (0, range(0, 2), range(0, 1))


def test_same_layout_is_rank_to_rank(tiny):
    cfg = dataclasses.replace(tiny, num_layers=4, num_kv_heads=2)
    plan = plan_handoff(node(cfg, tp=2, pp=2), node(cfg, tp=2, pp=2))
    assert plan.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    whole = KVNodeLayout.of(MODEL, cfg, 4, torch.float32, ParallelLayout())
    # Bytes moved equal the single-device pool's slice for the request: nothing twice.
    assert plan.nbytes(3) == plan_handoff(whole, whole).nbytes(3) == 3 * 4 * cfg.kv_bytes_per_token


# -- refused at registration, by name ---------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model": "other@def"}, "model"),
        ({"block_size": 8}, "block_size"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"head_dim": 16}, "head_dim"),
        ({"num_layers": 3}, "num_layers"),
        ({"num_kv_heads": 4}, "num_kv_heads"),
    ],
)
def test_a_decode_node_that_differs_is_refused_naming_the_field(tiny, changes, field):
    with pytest.raises(IncompatibleNodesError) as err:
        check_compatible(node(tiny), node(tiny, **changes))
    assert err.value.field == field
    with pytest.raises(IncompatibleNodesError):
        plan_handoff(node(tiny), node(tiny, **changes))


def test_the_model_is_named_before_what_follows_from_it(tiny):
    with pytest.raises(IncompatibleNodesError) as err:
        check_compatible(node(tiny), node(tiny, model="other@def", num_layers=9, block_size=8))
    assert err.value.field == "model"


@pytest.mark.parametrize(
    ("prefill", "decode", "field", "role"),
    [
        ({"tp": 3}, {}, "tensor_parallel_size", "prefill"),  # 3 vs 2 KV heads
        ({}, {"tp": 3}, "tensor_parallel_size", "decode"),
        ({}, {"pp": 5}, "pipeline_parallel_size", "decode"),  # 4 layers
    ],
)
def test_a_layout_the_model_cannot_take_is_refused_naming_the_node(
    tiny, prefill, decode, field, role
):
    with pytest.raises(IncompatibleNodesError) as err:
        check_compatible(node(tiny, **prefill), node(tiny, **decode))
    assert (err.value.field, err.value.role) == (field, role)
    assert role in str(err.value)


# -- coverage over random layouts and shapes ---------------------------------------------


@st.composite
def shapes(draw):
    kv = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    layers = draw(st.integers(1, 9))
    # tp and kv must divide one another; query heads = 8*kv so every such tp divides them.
    tps = sorted({d for d in range(1, kv + 1) if kv % d == 0} | {kv * m for m in (2, 4)})
    sides = [(draw(st.sampled_from(tps)), draw(st.integers(1, min(layers, 4)))) for _ in range(2)]
    return kv, layers, sides


@settings(max_examples=150, deadline=None)
@given(shapes())
def test_every_cell_a_decode_rank_holds_comes_once_from_a_prefill_rank_holding_it(shape):
    kv, layers, ((tp_p, pp_p), (tp_d, pp_d)) = shape
    base = ModelConfig.from_dir(tiny_model_path())
    cfg = dataclasses.replace(
        base, num_layers=layers, num_kv_heads=kv, num_heads=8 * kv, intermediate_size=8 * kv
    )
    prefill, decode = ParallelLayout(tp=tp_p, pp=pp_p), ParallelLayout(tp=tp_d, pp=pp_d)
    prefill.validate_for(cfg)
    decode.validate_for(cfg)
    plan = plan_handoff(
        KVNodeLayout.of(MODEL, cfg, 4, torch.float32, prefill),
        KVNodeLayout.of(MODEL, cfg, 4, torch.float32, decode),
    )

    def cells(layers: range, heads: range) -> set[tuple[int, int]]:
        return {(layer, h) for layer in layers for h in heads}

    src = {r: prefill.shard(r, cfg) for r in range(prefill.world_size)}
    for d in range(decode.world_size):
        shard = decode.shard(d, cfg)
        got = Counter(c for p in plan.to_rank(d) for c in cells(p.layers, p.kv_heads))
        assert set(got) == cells(shard.layers, shard.kv_heads)
        assert set(got.values()) == {1}
    for p in plan.pieces:
        assert cells(p.layers, p.kv_heads) <= cells(
            src[p.src_rank].layers, src[p.src_rank].kv_heads
        )
    # One piece per rank pair at most: the pair's channel moves one tensor per request.
    assert len(set(plan.pairs)) == len(plan.pairs)
    # Replicas share the sending: of the prefill ranks holding the same (stage, heads),
    # assigned KV differs by at most one destination piece's worth.
    for stage in range(pp_p):
        groups: dict[range, list[int]] = {}
        for t in range(tp_p):
            groups.setdefault(prefill.tp_kv_heads(t, kv), []).append(prefill.rank_of(stage, t))
        for ranks in groups.values():
            sent = [sum(len(p.layers) * len(p.kv_heads) for p in plan.from_rank(r)) for r in ranks]
            biggest = max(
                (len(p.layers) * len(p.kv_heads) for r in ranks for p in plan.from_rank(r)),
                default=0,
            )
            assert max(sent) - min(sent) <= biggest

"""Which rank holds what: pure arithmetic, no processes."""

from __future__ import annotations

import dataclasses

import pytest

from disagg.engine.model_config import ModelConfig
from disagg.engine.parallel.layout import ParallelLayout
from disagg.engine.tiny_model import tiny_model_path
from disagg.errors import ConfigError


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return ModelConfig.from_dir(tiny_model_path())  # 8 heads, 2 KV heads, 4 layers


def _cfg(tiny: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(tiny, **kw)


def test_kv_heads_split_when_tp_divides_them(tiny):
    cfg = _cfg(tiny, num_heads=8, num_kv_heads=4)
    shards = [ParallelLayout(tp=2).shard(r, cfg) for r in range(2)]
    assert [s.q_heads for s in shards] == [range(0, 4), range(4, 8)]
    assert [s.kv_heads for s in shards] == [range(0, 2), range(2, 4)]


def test_kv_heads_replicated_on_the_ranks_whose_queries_read_them(tiny):
    cfg = _cfg(tiny, num_heads=8, num_kv_heads=2)  # groups of 4 query heads per KV head
    layout = ParallelLayout(tp=8)
    shards = [layout.shard(r, cfg) for r in range(8)]
    for s in shards:
        (q,) = s.q_heads
        assert s.kv_heads == range(q // 4, q // 4 + 1)  # the KV head query head q reads
    assert [s.kv_heads.start for s in shards] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_uneven_layers_go_to_the_earlier_stages(tiny):
    cfg = _cfg(tiny, num_layers=5)
    layout = ParallelLayout(tp=2, pp=3)
    by_stage = {layout.shard(r, cfg).stage: layout.shard(r, cfg).layers for r in range(6)}
    assert by_stage == {0: range(0, 2), 1: range(2, 4), 2: range(4, 5)}
    last = layout.shard(5, cfg)
    assert last.is_last_stage and not last.is_driver and last.prev_rank == 3
    assert layout.shard(4, cfg).is_driver and layout.shard(4, cfg).stage_ranks == [4, 5]


def test_vocabulary_slices_cover_it_once_padded_to_equal_rows(tiny):
    cfg = _cfg(tiny, vocab_size=2047)
    shards = [ParallelLayout(tp=4).shard(r, cfg) for r in range(4)]
    assert {s.vocab_padded for s in shards} == {512}
    covered = [i for s in shards for i in s.vocab]
    assert covered == list(range(2047))


def test_the_local_config_is_the_ranks_part(tiny):
    shard = ParallelLayout(tp=2, pp=2).shard(3, tiny)
    local = shard.local_config(tiny)
    assert (local.num_heads, local.num_kv_heads, local.num_layers) == (4, 1, 2)
    assert local.intermediate_size == tiny.intermediate_size // 2
    assert local.head_dim == tiny.head_dim and local.hidden_size == tiny.hidden_size


@pytest.mark.parametrize(
    ("layout", "changes", "field"),
    [
        (ParallelLayout(tp=3), {}, "tensor_parallel_size"),  # 8 heads
        (ParallelLayout(tp=4), {"num_kv_heads": 6, "num_heads": 12}, "tensor_parallel_size"),
        (ParallelLayout(tp=2), {"intermediate_size": 705}, "tensor_parallel_size"),
        (ParallelLayout(pp=5), {}, "pipeline_parallel_size"),  # 4 layers
    ],
)
def test_layouts_the_model_cannot_take_are_refused_by_name(tiny, layout, changes, field):
    with pytest.raises(ConfigError) as info:
        layout.validate_for(_cfg(tiny, **changes))
    assert info.value.field == field


def test_degrees_must_be_positive_integers():
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        ParallelLayout(tp=0)
    with pytest.raises(ConfigError, match="pipeline_parallel_size"):
        ParallelLayout(pp=1.5)  # type: ignore[arg-type]

"""Moving a hand-off plan's pieces between rank pools, in process (no sockets).

The KV comes from a real single-device prefill of transformers-written checkpoints, and
that pool is first checked against transformers' own KV cache for the same prompts. It
is then split as each prefill layout's ranks hold it (``ParallelLayout.shard``), handed
by plan + gather + scatter into each decode layout's rank pools (other block ids), and
every decode rank's pool must equal the slice of the single-device pool it should hold,
with every block outside the request's untouched.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from disagg import SamplingParams
from disagg.engine.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.kv_cache import KVCache, KVCacheSpec
from disagg.engine.parallel.handoff import KVNodeLayout, Piece, plan_handoff
from disagg.engine.parallel.handoff_kv import (
    copy_plan,
    gather_piece,
    move_rank_pieces,
    piece_shape,
    recv_piece,
    scatter_piece,
    send_piece,
)
from disagg.engine.parallel.layout import ParallelLayout
from kv_transfer import LocalHub, PairGroups, TransferChecksumError, make_backend, new_endpoint
from kv_transfer.errors import InvalidTransferArgument
from kv_transfer.layout import ByteBuffer
from tests.engine.hf_models import make_hf_checkpoint
from tests.engine.parallel_models import make_qwen2_mqa

BLOCK_SIZE = 4
NUM_BLOCKS = 24
PROMPT_LENS = (5, 17)  # a part-filled block, and several blocks

# (model, (tp_p, pp_p), (tp_d, pp_d)). llama: 2 layers, 2 KV heads; qwen2-mqa: 3 layers
# (pp = 2 splits them 2 + 1), one KV head (replicated at tp = 2).
CASES = [
    ("llama", (2, 1), (1, 2)),
    ("llama", (1, 1), (2, 1)),
    ("llama", (1, 2), (2, 1)),
    ("llama", (2, 2), (1, 1)),
    ("qwen2-mqa", (2, 1), (1, 1)),
    ("qwen2-mqa", (1, 1), (2, 1)),
    ("qwen2-mqa", (2, 1), (1, 2)),
    ("qwen2-mqa", (2, 2), (2, 1)),
]


@pytest.fixture(scope="module")
def prefilled(tmp_path_factory):
    """Per model: the single-device pool after one prefill batch, the requests' block
    tables and prompts."""
    root = tmp_path_factory.mktemp("handoff")
    paths = {
        "llama": make_hf_checkpoint("llama", root / "llama"),
        "qwen2-mqa": make_qwen2_mqa(root / "qwen2-mqa"),
    }
    out = {}
    gen = torch.Generator().manual_seed(7)
    for name, path in paths.items():
        engine = LLMEngine(
            EngineConfig(
                model=str(path),
                device="cpu",
                dtype="float32",
                block_size=BLOCK_SIZE,
                num_blocks=NUM_BLOCKS,
            )
        )
        prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in PROMPT_LENS]
        seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=4)) for p in prompts]
        engine.step()  # one prefill batch: both prompts' KV now in the pool
        assert all(
            len(s.block_table) == -(-n // BLOCK_SIZE)
            for s, n in zip(seqs, PROMPT_LENS, strict=True)
        )
        out[name] = (path, engine, [list(s.block_table) for s in seqs], prompts)
    return out


def test_the_single_device_pool_holds_transformers_kv(prefilled):
    """The reference every hand-off is checked against is itself checked against
    transformers' KV cache (K after RoPE, V), layer by layer."""
    import transformers as tf

    for path, engine, tables, prompts in prefilled.values():
        hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for table, prompt in zip(tables, prompts, strict=True):
            with torch.no_grad():
                cache = hf(torch.tensor([prompt]), use_cache=True).past_key_values
            n = len(prompt)
            for layer, (k_pool, v_pool) in enumerate(engine.kv_cache.layers):
                k_ref, v_ref = cache.layers[layer].keys[0], cache.layers[layer].values[0]
                # pool blocks (n_blocks, bs, H_kv, D) -> tokens (T, H_kv, D) -> (H_kv, T, D)
                k = k_pool[table].reshape(-1, *k_pool.shape[2:])[:n].transpose(0, 1)
                v = v_pool[table].reshape(-1, *v_pool.shape[2:])[:n].transpose(0, 1)
                torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)


def rank_pools(
    engine: LLMEngine, layout: ParallelLayout, full: torch.Tensor | None, device: str = "cpu"
):
    """Each rank's pool of ``layout``: a copy of its slice of ``full`` (prefill), or zeros."""
    cfg = engine.model_config
    pools = {}
    for r in range(layout.world_size):
        s = layout.shard(r, cfg)
        spec = KVCacheSpec(
            len(s.layers),
            len(s.kv_heads),
            cfg.head_dim,
            BLOCK_SIZE,
            torch.float32,
            first_layer=s.layers.start,
            first_kv_head=s.kv_heads.start,
        )
        pool = KVCache(spec, NUM_BLOCKS, torch.device(device))
        if full is not None:
            pool.data.copy_(_slice(full, s.layers, s.kv_heads))
        pools[r] = pool
    return pools


def _slice(data: torch.Tensor, layers: range, heads: range) -> torch.Tensor:
    # (L, 2, blocks, bs, H_kv, D) -> this range of layers and heads
    return data[layers.start : layers.stop, :, :, :, heads.start : heads.stop]


@pytest.mark.parametrize(
    ("model", "src", "dst"),
    CASES,
    ids=[f"{m}-tp{s[0]}pp{s[1]}-to-tp{d[0]}pp{d[1]}" for m, s, d in CASES],
)
def test_each_decode_rank_receives_exactly_its_slice_of_the_prefill(prefilled, model, src, dst):
    _, engine, tables, _ = prefilled[model]
    cfg, full = engine.model_config, engine.kv_cache.data
    src_layout, dst_layout = ParallelLayout(*src), ParallelLayout(*dst)
    src_layout.validate_for(cfg)
    dst_layout.validate_for(cfg)
    plan = plan_handoff(
        KVNodeLayout.of(model, cfg, BLOCK_SIZE, torch.float32, src_layout),
        KVNodeLayout.of(model, cfg, BLOCK_SIZE, torch.float32, dst_layout),
    )
    src_pools = rank_pools(engine, src_layout, full)
    dst_pools = rank_pools(engine, dst_layout, None)
    # The decode node's block tables: other ids, in another order.
    dst_tables = [[NUM_BLOCKS - 1 - 2 * i - j for i in range(len(t))] for j, t in enumerate(tables)]
    for src_blocks, dst_blocks in zip(tables, dst_tables, strict=True):
        copy_plan(plan, src_pools, src_blocks, dst_pools, dst_blocks)

    used = sorted(b for t in dst_tables for b in t)
    untouched = [b for b in range(NUM_BLOCKS) if b not in used]
    for r, pool in dst_pools.items():
        s = dst_layout.shard(r, cfg)
        expected = _slice(full, s.layers, s.kv_heads)
        for src_blocks, dst_blocks in zip(tables, dst_tables, strict=True):
            assert torch.equal(pool.data[:, :, dst_blocks], expected[:, :, src_blocks])
        assert not pool.data[:, :, untouched].any()


def test_a_piece_goes_through_a_staging_buffer_and_bad_arguments_are_refused(prefilled):
    _, engine, tables, _ = prefilled["llama"]
    full = engine.kv_cache.data
    assert engine.model_config.num_kv_heads == 2  # tp = 2 splits them, one per rank
    (src,) = rank_pools(engine, ParallelLayout(), full).values()
    dst = rank_pools(engine, ParallelLayout(tp=2), None)[1]  # KV head 1 only
    piece = Piece(0, 1, range(0, 2), range(1, 2))
    blocks = tables[1]
    staged = torch.empty(piece_shape(piece, len(blocks), src))
    got = gather_piece(src, piece, blocks, out=staged)
    assert got.data_ptr() == staged.data_ptr()
    assert torch.equal(staged, _slice(full, range(0, 2), range(1, 2))[:, :, blocks])
    scatter_piece(dst, piece, [0, 1, 2, 3, 4], staged)
    assert torch.equal(dst.data[:, :, :5], staged)

    with pytest.raises(InvalidTransferArgument) as err:  # head 0 is not in this pool
        scatter_piece(dst, Piece(0, 1, range(0, 2), range(0, 1)), [0, 1, 2, 3, 4], staged)
    assert err.value.field == "kv_heads"
    with pytest.raises(InvalidTransferArgument) as err:
        gather_piece(src, Piece(0, 0, range(1, 3), range(0, 1)), blocks)
    assert err.value.field == "layers"
    with pytest.raises(InvalidTransferArgument) as err:
        scatter_piece(dst, piece, [0, 0, 1, 2, 3], staged)
    assert err.value.field == "block_ids"
    with pytest.raises(InvalidTransferArgument) as err:
        scatter_piece(dst, piece, [0, 1, 2, 3, NUM_BLOCKS], staged)
    assert err.value.field == "block_ids"
    with pytest.raises(InvalidTransferArgument) as err:  # four blocks named, five sent
        scatter_piece(dst, piece, [0, 1, 2, 3], staged)
    assert err.value.field == "data"


@pytest.mark.parametrize(("src", "dst"), [((1, 1), (2, 1)), ((2, 1), (1, 2)), ((2, 2), (1, 1))])
def test_pieces_cross_a_transfer_channel_into_each_decode_ranks_pool(prefilled, src, dst):
    """send_piece / recv_piece over the in-process backend (the same interface as the
    pair channels): staged where a piece holds only some of a pool's heads, straight
    from and into the pool where it holds all of them."""
    _, engine, tables, prompts = prefilled["llama"]
    cfg, full = engine.model_config, engine.kv_cache.data
    src_layout, dst_layout = ParallelLayout(*src), ParallelLayout(*dst)
    plan = plan_handoff(
        KVNodeLayout.of("llama", cfg, BLOCK_SIZE, torch.float32, src_layout),
        KVNodeLayout.of("llama", cfg, BLOCK_SIZE, torch.float32, dst_layout),
    )
    src_pools = rank_pools(engine, src_layout, full)
    dst_pools = rank_pools(engine, dst_layout, None)
    hub = LocalHub()
    first_dst = src_layout.world_size  # hub endpoints: prefill ranks, then decode ranks
    ends = {r: make_backend("local", hub=hub, rank=r, checksums=True) for r in range(8)}
    staging = ByteBuffer(torch.device("cpu"))
    table, prompt = tables[1], prompts[1]
    dst_blocks = list(range(len(table)))
    for p in plan.pieces:
        send_piece(
            ends[p.src_rank],
            "r1",
            src_pools[p.src_rank],
            p,
            table,
            first_dst + p.dst_rank,
            num_tokens=len(prompt),
            timeout=5.0,
            staging=staging,
        )
        recv_piece(
            ends[first_dst + p.dst_rank],
            "r1",
            dst_pools[p.dst_rank],
            p,
            dst_blocks,
            p.src_rank,
            num_tokens=len(prompt),
            timeout=5.0,
            staging=staging,
        )
    for r, pool in dst_pools.items():
        s = dst_layout.shard(r, cfg)
        assert torch.equal(
            pool.data[:, :, dst_blocks], _slice(full, s.layers, s.kv_heads)[:, :, table]
        )


def test_a_corrupted_piece_is_refused_and_leaves_the_decode_pool_untouched(prefilled):
    _, engine, tables, prompts = prefilled["llama"]
    full = engine.kv_cache.data
    assert engine.model_config.num_kv_heads == 2  # tp = 2 splits them, one per rank
    (src,) = rank_pools(engine, ParallelLayout(), full).values()
    dst = rank_pools(engine, ParallelLayout(tp=2), None)[1]
    piece = Piece(0, 1, range(0, 2), range(1, 2))  # staged on both sides

    def corrupt(layer: int, staged: torch.Tensor) -> None:
        if layer == 1:
            staged.view(-1)[3] += 1.0

    hub = LocalHub()
    sender = make_backend("local", hub=hub, rank=0, checksums=True, on_layer_staged=corrupt)
    receiver = make_backend("local", hub=hub, rank=1, checksums=True)
    table, n = tables[1], len(prompts[1])
    send_piece(sender, 9, src, piece, table, 1, num_tokens=n, timeout=5.0)
    with pytest.raises(TransferChecksumError):
        recv_piece(receiver, 9, dst, piece, list(range(len(table))), 0, num_tokens=n, timeout=5.0)
    assert not dst.data.any()


def test_a_rank_moves_its_pieces_one_thread_per_peer_and_one_bad_pair_fails_it(prefilled):
    """move_rank_pieces: prefill pp2 -> decode tp2 (each decode rank reads from both
    stages); then the same with stage 1's channel corrupting a layer."""
    _, engine, tables, prompts = prefilled["llama"]
    cfg, full = engine.model_config, engine.kv_cache.data
    src_layout, dst_layout = ParallelLayout(pp=2), ParallelLayout(tp=2)
    plan = plan_handoff(
        KVNodeLayout.of("llama", cfg, BLOCK_SIZE, torch.float32, src_layout),
        KVNodeLayout.of("llama", cfg, BLOCK_SIZE, torch.float32, dst_layout),
    )
    table, n = tables[1], len(prompts[1])
    dst_blocks = list(range(3, 3 + len(table)))

    def hand_off(corrupt_from: int | None) -> dict[int, KVCache]:
        hub = LocalHub()

        def corrupt(layer: int, staged: torch.Tensor) -> None:
            staged.view(-1)[0] += 1.0

        ends = {
            r: make_backend(
                "local", hub=hub, rank=r, checksums=True,
                on_layer_staged=corrupt if r == corrupt_from else None,
            )
            for r in range(4)
        }  # fmt: skip
        src_pools = rank_pools(engine, src_layout, full)
        dst_pools = rank_pools(engine, dst_layout, None)
        for r, pool in src_pools.items():  # the in-process send does not wait: first
            channels = {d: (ends[r], 2 + d) for d in range(2)}
            move_rank_pieces("send", 5, pool, plan.from_rank(r), table, channels,
                             num_tokens=n, timeout=5.0)  # fmt: skip
        for d, pool in dst_pools.items():
            channels = {r: (ends[2 + d], r) for r in range(2)}
            staging = {r: ByteBuffer(torch.device("cpu")) for r in range(2)}
            stats = move_rank_pieces("recv", 5, pool, plan.to_rank(d), dst_blocks, channels,
                                     num_tokens=n, timeout=5.0, staging=staging)  # fmt: skip
            assert [s.peer for s in stats] == [0, 1]
        return dst_pools

    for d, pool in hand_off(None).items():
        s = dst_layout.shard(d, cfg)
        assert torch.equal(
            pool.data[:, :, dst_blocks], _slice(full, s.layers, s.kv_heads)[:, :, table]
        )
    with pytest.raises(TransferChecksumError):
        hand_off(corrupt_from=1)


@pytest.mark.cuda
def test_pieces_move_between_cuda_pools_as_on_cpu(prefilled):
    """The CUDA scatter (one index_copy_) writes what the CPU one (a copy per block) does."""
    _, engine, tables, _ = prefilled["qwen2-mqa"]
    cfg, full = engine.model_config, engine.kv_cache.data
    src_layout, dst_layout = ParallelLayout(tp=2, pp=2), ParallelLayout(pp=3)
    plan = plan_handoff(
        KVNodeLayout.of("q", cfg, BLOCK_SIZE, torch.float32, src_layout),
        KVNodeLayout.of("q", cfg, BLOCK_SIZE, torch.float32, dst_layout),
    )
    cpu_pools = rank_pools(engine, dst_layout, None)
    copy_plan(plan, rank_pools(engine, src_layout, full), tables[1], cpu_pools, [9, 2, 5, 7, 0])
    gpu_pools = rank_pools(engine, dst_layout, None, "cuda")
    src = rank_pools(engine, src_layout, full, "cuda")
    copy_plan(plan, src, tables[1], gpu_pools, [9, 2, 5, 7, 0])
    for r, pool in gpu_pools.items():
        assert torch.equal(pool.data.cpu(), cpu_pools[r].data)
        assert cpu_pools[r].data.any()


def test_tp2_to_pp2_over_real_gloo_pair_channels(prefilled):
    """Four endpoints (two prefill ranks, two decode ranks) as threads of this process,
    one gloo pair group per rank pair of the plan, through a real TCPStore."""
    _, engine, tables, prompts = prefilled["llama"]
    cfg, full = engine.model_config, engine.kv_cache.data
    src_layout, dst_layout = ParallelLayout(tp=2), ParallelLayout(pp=2)
    plan = plan_handoff(
        KVNodeLayout.of("llama", cfg, BLOCK_SIZE, torch.float32, src_layout),
        KVNodeLayout.of("llama", cfg, BLOCK_SIZE, torch.float32, dst_layout),
    )
    assert len(plan.pairs) == 4
    src_pools = rank_pools(engine, src_layout, full)
    dst_pools = rank_pools(engine, dst_layout, None)
    table, n = tables[1], len(prompts[1])
    dst_blocks = [11, 3, 8, 0, 5]
    host = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=30), wait_for_workers=False
    )
    address = f"127.0.0.1:{host.port}"
    names = {("send", r): new_endpoint(f"prefill-{r}") for r in range(2)}
    names |= {("recv", d): new_endpoint(f"decode-{d}") for d in range(2)}

    def rank(side: str, r: int) -> int:
        groups = PairGroups(address, names[side, r], "gloo", timeout=30)
        pieces = plan.from_rank(r) if side == "send" else plan.to_rank(r)
        channels = {}
        for p in pieces:  # both sides form their pairs in the plan's order
            peer = p.dst_rank if side == "send" else p.src_rank
            group, index = groups.form(names["recv" if side == "send" else "send", peer])
            channels[peer] = (make_backend("gloo", group=group, checksums=True), index)
        pool = src_pools[r] if side == "send" else dst_pools[r]
        blocks = table if side == "send" else dst_blocks
        stats = move_rank_pieces(side, 3, pool, pieces, blocks, channels, num_tokens=n,
                                 timeout=30)  # fmt: skip
        for backend, _ in channels.values():
            backend.close()
        return sum(s.bytes for s in stats)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(rank, side, r) for side, r in names]
        moved = [f.result(timeout=120) for f in futures]
    assert sum(moved[:2]) == sum(moved[2:]) == plan.nbytes(len(table))
    for d, pool in dst_pools.items():
        s = dst_layout.shard(d, cfg)
        assert torch.equal(
            pool.data[:, :, dst_blocks], _slice(full, s.layers, s.kv_heads)[:, :, table]
        )

"""Loading one rank's shard of a Hugging Face checkpoint.

Each tensor is read through ``safe_open(...).get_slice``, so a rank reads (and
holds) only its rows or columns, and only its stage's layers: no rank materialises
the whole model. Names, the full shape of every checkpoint tensor and the
completeness of the rank's parameters are checked as :func:`checkpoint.load_model`
checks them for one device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from disagg.engine.checkpoint import weight_files
from disagg.engine.model import CausalLM
from disagg.engine.model_config import ModelConfig
from disagg.engine.parallel.layers import TensorGroup, shard_model, tie_sharded
from disagg.engine.parallel.layout import RankShard
from disagg.errors import CheckpointError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True, slots=True)
class Piece:
    """Where one checkpoint tensor's slice goes: ``param`` (local name), rows
    ``[offset, offset + n)`` of it; ``dim``/``index`` select the slice of the file's
    tensor (``index`` None: all of it)."""

    param: str
    offset: int
    dim: int
    index: range | None


def load_rank_model(
    model_dir: str | Path,
    config: ModelConfig,
    shard: RankShard,
    group: TensorGroup,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
) -> CausalLM:
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = CausalLM(shard.local_config(config), max_positions)
        shard_model(model, shard, group, vocab_size=config.vocab_size, dtype=dtype)
        # The whole model's shapes, to check each checkpoint tensor: free on meta.
        full_shapes = {
            n: tuple(p.shape) for n, p in CausalLM(config, max_positions).named_parameters()
        }
    model = model.to(dtype=dtype).to_empty(device=device)
    tie_sharded(model, shard)
    model.model.rope.reset_cache()
    params = dict(model.named_parameters())
    for p in params.values():
        p.data.zero_()  # vocabulary padding rows must be zero; the rest is overwritten
    pending: dict[str, set[int]] = {
        name: set(range(len(model.shard_sizes(name.split(".")[-2]))))
        if name.split(".")[-2] in ("qkv_proj", "gate_up_proj")
        else {0}
        for name in params
    }
    with torch.no_grad():
        for f in files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as reader:
                    for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                        _load_tensor(
                            reader, name, model, config, shard, params, full_shapes, pending, f
                        )
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(str(f), f"unreadable safetensors file ({exc})") from exc
    missing = sorted(f"{name} (part {i})" for name, parts in pending.items() for i in parts)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            str(model_dir),
            f"{len(missing)} weights of rank {shard.rank} missing from the checkpoint: {shown}",
        )
    return model.eval()


def _load_tensor(reader, name, model, config, shard, params, full_shapes, pending, path) -> None:
    found = _pieces(name, model, config, shard, full_shapes)
    if found is None:
        return  # another stage's layer, or not a parameter (e.g. rotary inv_freq buffers)
    full_shape, placements = found
    sl = reader.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != full_shape:
        raise CheckpointError(
            str(path), f"tensor {name!r} has shape {shape}, the config implies {full_shape}"
        )
    for piece, part in placements:
        if piece.index is None:
            tensor = sl[:]
        elif piece.dim == 0:
            tensor = sl[piece.index.start : piece.index.stop]
        else:
            tensor = sl[:, piece.index.start : piece.index.stop]
        dest = params[piece.param].narrow(0, piece.offset, tensor.shape[0])
        assert dest.shape == tensor.shape, (name, dest.shape, tensor.shape)
        dest.copy_(tensor)
        pending[piece.param].discard(part)


def _pieces(
    name: str,
    model: CausalLM,
    config: ModelConfig,
    shard: RankShard,
    full_shapes: dict[str, tuple[int, ...]],
) -> tuple[tuple[int, ...], list[tuple[Piece, int]]] | None:
    """The full shape a checkpoint tensor must have and where this rank's slices of it
    go, as ``(Piece, part of a fused parameter)``; None when this rank holds none of it."""
    d = config.head_dim
    q, kv, inter, voc = shard.q_heads, shard.kv_heads, shard.intermediate, shard.vocab
    m = _LAYER.match(name)
    if m is None:
        if name not in full_shapes:
            return None
        targets: list[Piece] = []
        if name == "model.embed_tokens.weight":
            if shard.is_first_stage:
                targets.append(Piece(name, 0, 0, voc))
            if config.tie_word_embeddings and shard.is_last_stage and not shard.is_first_stage:
                targets.append(Piece("lm_head.weight", 0, 0, voc))  # the tied head's own copy
        elif name == "lm_head.weight":
            if shard.is_last_stage and not config.tie_word_embeddings:
                targets.append(Piece(name, 0, 0, voc))
        elif shard.is_last_stage:  # model.norm.weight
            targets.append(Piece(name, 0, 0, None))
        return (full_shapes[name], [(t, 0) for t in targets]) if targets else None
    layer, rest = int(m.group(1)), m.group(2)
    if layer not in shard.layers:
        return None
    local = f"model.layers.{layer - shard.layers.start}."
    module, _, kind = rest.rpartition(".")  # e.g. "self_attn.q_proj", "weight"
    fragment = module.rpartition(".")[2]
    fused = CausalLM.FUSED_SHARDS.get(fragment)
    if fused is None:
        global_name = f"model.layers.{layer}.{rest}"
        if global_name not in full_shapes:
            return None
        full = full_shapes[global_name]
        if fragment in ("o_proj", "down_proj") and kind == "weight":  # row-parallel: columns
            cols = range(q.start * d, q.stop * d) if fragment == "o_proj" else inter
            return full, [(Piece(local + rest, 0, 1, cols), 0)]
        return full, [(Piece(local + rest, 0, 0, None), 0)]
    target, part = fused
    fused_rest = rest.replace(f"{fragment}.", f"{target}.")
    global_name = f"model.layers.{layer}.{fused_rest}"
    if global_name not in full_shapes:
        return None
    global_sizes = {
        "q_proj": config.q_size,
        "k_proj": config.kv_size,
        "v_proj": config.kv_size,
        "gate_proj": config.intermediate_size,
        "up_proj": config.intermediate_size,
    }
    rows = {
        "q_proj": range(q.start * d, q.stop * d),
        "k_proj": range(kv.start * d, kv.stop * d),
        "v_proj": range(kv.start * d, kv.stop * d),
        "gate_proj": inter,
        "up_proj": inter,
    }[fragment]
    full = (global_sizes[fragment], *full_shapes[global_name][1:])
    offset = sum(model.shard_sizes(target)[:part])
    return full, [(Piece(local + fused_rest, offset, 0, rows), part)]

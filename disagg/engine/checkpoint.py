"""Loading a Hugging Face checkpoint directory (safetensors, single or sharded) into a
:class:`CausalLM`. Never downloads: the directory must already be on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from disagg.engine.model import CausalLM
from disagg.engine.model_config import ModelConfig
from disagg.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it is sharded."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(str(index), f"not a valid safetensors index ({exc!r})") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(str(index), "'weight_map' must map tensor names to file names")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(str(f), f"missing: listed in {INDEX_FILE}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(
        str(model_dir), f"no weights: expected {SINGLE_FILE} or {INDEX_FILE} (safetensors only)"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as reader:
                for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, reader.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(str(f), f"unreadable safetensors file ({exc})") from exc


def load_model(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
) -> CausalLM:
    """Builds the model on the meta device, materialises it on ``device`` and copies
    every checkpoint tensor into place, checking names and shapes."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = CausalLM(config, max_positions)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    model.model.rope.reset_cache()

    params = dict(model.named_parameters())
    pending = {name: _expected_pieces(model, name) for name in params}
    if config.tie_word_embeddings:
        pending.pop("lm_head.weight", None)  # shares the embedding's storage
    with torch.no_grad():
        for name, tensor in iter_tensors(files):
            target, shard = _map_name(name)
            if target not in params:
                continue  # e.g. rotary inv_freq buffers some checkpoints carry
            param = params[target]
            if shard is None:
                dest = param
            else:
                sizes = model.shard_sizes(target.split(".")[-2])
                start = sum(sizes[:shard])
                dest = param.narrow(0, start, sizes[shard])
            if tuple(dest.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    str(files[0].parent),
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(dest.shape)}",
                )
            dest.copy_(tensor)
            pending.get(target, set()).discard(shard)
    # Named as the checkpoint names them (k_proj, not our fused qkv_proj).
    missing = sorted(_hf_name(name, piece) for name, pieces in pending.items() for piece in pieces)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            str(model_dir), f"{len(missing)} weights missing from the checkpoint: {shown}"
        )
    return model.eval()


def _map_name(hf_name: str) -> tuple[str, int | None]:
    for fragment, (fused, shard) in CausalLM.FUSED_SHARDS.items():
        if f".{fragment}." in hf_name:
            return hf_name.replace(f".{fragment}.", f".{fused}."), shard
    return hf_name, None


def _hf_name(name: str, shard: int | None) -> str:
    """Inverse of :func:`_map_name`."""
    if shard is None:
        return name
    fused = name.split(".")[-2]
    for fragment, target in CausalLM.FUSED_SHARDS.items():
        if target == (fused, shard):
            return name.replace(f".{fused}.", f".{fragment}.")
    raise AssertionError(f"no checkpoint name for shard {shard} of {name}")


def _expected_pieces(model: CausalLM, name: str) -> set[int | None]:
    fused = name.split(".")[-2] if "." in name else ""
    if fused in ("qkv_proj", "gate_up_proj"):
        return set(range(len(model.shard_sizes(fused))))
    return {None}

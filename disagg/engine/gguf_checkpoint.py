"""GGUF checkpoints (llama.cpp's single-file format), read with the ``gguf`` package.

A GGUF file is converted once into a Hugging Face-style directory under the cache
(``config.json``, a float32 ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with the chat template, ``generation_config.json``), so the
rest of the engine loads it exactly as it loads any local checkpoint, and a second
start only maps the cached safetensors. The cache entry is keyed by the file's path,
size and modification time and by :data:`CONVERTER_VERSION`.

Two things differ from a Hugging Face checkpoint and are undone here:
- tensor names (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``);
- for ``llama``, llama.cpp's converter permutes the rows of the q and k projections of
  every head from the rotate-half RoPE layout (first half, second half) to interleaved
  pairs, since its kernel rotates adjacent pairs; our model (like transformers) uses
  rotate-half, so the permutation is inverted. ``qwen2`` files are not permuted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from disagg.errors import (
    CheckpointError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
)

log = logging.getLogger(__name__)

CONVERTER_VERSION = 2

# GGUF ``general.architecture`` -> (Hugging Face architecture, q/k rows permuted for RoPE).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

# Every type gguf.quants dequantizes that the tests check against an independent
# implementation (transformers') or a quantize/dequantize round trip.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over the file (memory-mapped), or a ``CheckpointError``."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError) as exc:  # bad magic, truncated file
        raise CheckpointError(str(path), f"not a readable GGUF file ({exc})") from exc


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key with its value as Python data (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one we do not know."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _PER_LAYER:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"


def hf_config(
    meta: dict[str, Any],
    tensor_names: set[str],
    source: str,
    rope_freqs: np.ndarray | None = None,
) -> dict[str, Any]:
    """The ``config.json`` the file's metadata describes; ``rope_freqs`` is the file's
    ``rope_freqs.weight`` tensor when it has one (Llama 3.1's RoPE scaling)."""
    try:
        config = _hf_config(meta, tensor_names, source)
    except (TypeError, ValueError, ZeroDivisionError) as exc:  # a string where a count belongs
        raise CheckpointError(source, f"a metadata value is invalid ({exc})") from exc
    if rope_freqs is not None:
        config["rope_scaling"] = _llama3_rope_scaling(
            np.asarray(rope_freqs, dtype=np.float64).reshape(-1), config, source
        )
    return config


def _llama3_rope_scaling(
    factors: np.ndarray, config: dict[str, Any], source: str
) -> dict[str, Any]:
    """Llama 3's RoPE scaling parameters that reproduce the file's per-frequency
    divisors. llama.cpp's converter stores only the divisors (1 for short wavelengths,
    ``factor`` for long ones, a smooth band between), so the band's edges are recovered
    from the band (low_freq_factor fixed at 1, as in every Llama 3 release) or taken to
    be Llama 3.1's; whatever is found must reproduce every divisor, else it is refused."""
    import torch

    from disagg.engine.model_config import RopeScaling
    from disagg.engine.rope import inverse_frequencies

    head_dim, theta = config["head_dim"], config["rope_theta"]
    base = inverse_frequencies(head_dim, theta, None).double().numpy()
    if factors.shape != base.shape:
        raise CheckpointError(source, f"rope_freqs has {factors.size} values, not {base.size}")
    factor = float(factors.max())
    wavelen = 2 * np.pi / base
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidates = [(1.0, 4.0, 8192)]
    if band.sum() >= 2:
        # In the band, 1/divisor = (1 - s)/factor + s with s = orig/wavelen - low over
        # (high - low): linear in 1/wavelen.
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[band], smooth, 1)
        if intercept < 0:
            high = 1 - 1 / intercept
            candidates.insert(0, (1.0, float(high), round(slope * (high - 1))))
    for low, high, original in candidates:
        scaling = RopeScaling(factor, low, high, int(original))
        scaled = inverse_frequencies(head_dim, theta, scaling).to(torch.float64).numpy()
        if np.allclose(base / scaled, factors, rtol=1e-4, atol=0):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": round(high, 6),
                "original_max_position_embeddings": int(original),
            }
    raise CheckpointError(source, "rope_freqs is not a Llama 3 RoPE scaling this loader recovers")


def _hf_config(meta: dict[str, Any], tensor_names: set[str], source: str) -> dict[str, Any]:
    arch = str(meta.get("general.architecture", "<none>"))
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(arch, list(ARCHITECTURES))

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise CheckpointError(source, f"metadata key {arch}.{key!r} is missing")
        return meta[f"{arch}.{key}"]

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(source, f"RoPE scaling {scaling!r} is not supported")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos = [
        meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta
    ]
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rotary = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(
            source, f"partial RoPE ({rotary} of {head_dim} dimensions) is not supported"
        )
    file_type = int(meta.get("general.file_type", 0))
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": arch,
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "attention_bias": arch == "llama" and "blk.0.attn_output.bias" in tensor_names,
        # llama.cpp writes no output.weight when the head shares the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        # The precision to run in on GPUs: llama.cpp's file type 0 is all-F32, 1 mostly F16.
        "dtype": {0: "float32", 1: "float16"}.get(file_type, "bfloat16"),
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def hf_tensors(
    reader: Any, config: dict[str, Any], source: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor dequantized to float32, named and laid out as Hugging Face's."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    permute = ARCHITECTURES[config["model_type"]][1]
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # read into the config (rope_scaling), not a weight
        name = hf_name(tensor.name)
        if name is None:
            raise CheckpointError(source, f"tensor {tensor.name!r} has no counterpart in the model")
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if qtype.name not in SUPPORTED_TYPES:
            raise UnsupportedQuantizationError(
                source, tensor.name, qtype.name, list(SUPPORTED_TYPES)
            )
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        values = np.array(dequantize(tensor.data, qtype), dtype=np.float32)
        # GGUF lists dimensions innermost first; numpy (and torch) outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = values.reshape(shape)
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            values = _unpermute_rope_rows(values, heads)
        yield name, values


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverts llama.cpp's per-head row permutation: within a head, GGUF row ``2j + p``
    holds Hugging Face row ``p * head_dim / 2 + j``."""
    rows = w.shape[0]
    half = rows // heads // 2
    # (heads, half, 2, in) -> (heads, 2, half, in): pairs back to halves.
    return np.ascontiguousarray(
        w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# -- the cached conversion ----------------------------------------------------------------


def converted_dir(path: Path) -> Path:
    """The cached Hugging Face-style directory for the GGUF file at ``path``, converted on
    first use. Safe when processes race: each writes its own staging copy, one rename
    wins, the others use the winner's."""
    from disagg.engine.tiny_model import cache_dir

    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    # The file's own name last, so that whatever names a model by its directory (the
    # profiler, logs) shows "SmolLM2-135M-Instruct.Q4_1", not a digest.
    out = cache_dir() / "gguf" / digest / path.stem
    # Non-empty means complete: the directory only ever appears by an atomic rename.
    if out.is_dir() and any(out.iterdir()):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        started = time.perf_counter()
        write_converted(path, staging)
        staging.chmod(0o755)
        try:
            # POSIX rename replaces an empty directory and fails on a non-empty one.
            staging.rename(out)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        log.info("converted %s into %s in %.1f s", path.name, out, time.perf_counter() - started)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def write_converted(path: Path, out: Path) -> None:
    """Writes the Hugging Face-style files for the GGUF file at ``path`` into ``out``."""
    import torch
    from safetensors.torch import save_file

    from disagg.engine.gguf_tokenizer import build_tokenizer, tokenizer_config

    source = str(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    rope_freqs = next((t.data for t in reader.tensors if t.name == ROPE_FREQS), None)
    config = hf_config(meta, {t.name for t in reader.tensors}, source, rope_freqs)
    tensors = {
        name: torch.from_numpy(values) for name, values in hf_tensors(reader, config, source)
    }
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(source, "tensor 'token_embd.weight' is missing")
    config["vocab_size"] = int(embed.shape[0])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(out / "config.json", config)
    tokenizer = build_tokenizer(meta, source)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(meta))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    for file in out.iterdir():
        file.chmod(0o644)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

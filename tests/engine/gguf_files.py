"""Small GGUF files written with ``gguf.GGUFWriter`` (llama.cpp's own writer), from
checkpoints transformers wrote, laid out the way llama.cpp's converter lays them out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# A small byte-level BPE vocabulary: three control tokens, the 256 byte symbols, a few
# merges, then unused entries up to the model's vocabulary size.
CONTROL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "Ġa n", "Ġan d"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (its published table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    symbols = dict.fromkeys(range(256), "")
    extra = 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocabulary(size: int) -> tuple[list[str], list[int]]:
    tokens = CONTROL_TOKENS + byte_symbols()
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(CONTROL_TOKENS) + [1] * (len(tokens) - len(CONTROL_TOKENS))
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return tokens, types


SPM_PIECES = ["▁", "e", "t", "h", "a", "n", "d", "o", "r", "s", "▁t", "he", "▁the", "an",
              "▁an", "▁and", "nd", "▁h", "▁hand", "er", "or", "▁s", "▁so", "▁or"]  # fmt: skip


def sentencepiece_vocabulary(size: int) -> tuple[list[str], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens <0xNN>, then word pieces."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [2, 3, 3, *[6] * 256, *[1] * len(SPM_PIECES)]
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return tokens, types


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> pairs)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(
    path: Path,
    arch: str,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    *,
    qtype: str = "F32",
    metadata: dict[str, Any] | None = None,
    tokenizer: bool = True,
    sentencepiece: bool = False,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """Writes ``tensors`` (Hugging Face names and layout) as llama.cpp would: GGUF names,
    q/k permuted for ``llama``, 2-D weights quantised as ``qtype`` (norms stay F32)."""
    import gguf
    from gguf.quants import quantize

    qt = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    writer.add_rope_freq_base(float(theta or 10000.0))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer and sentencepiece:
        tokens, types = sentencepiece_vocabulary(config["vocab_size"])
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # Unique scores, best first: the merges are derived from them.
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    elif tokenizer:
        tokens, types = vocabulary(config["vocab_size"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, value in tensors.items():
        w = np.ascontiguousarray(value, dtype=np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            w = permute_rope_rows(w, heads)
        if w.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), quantize(w, qt), raw_dtype=qt)
        else:
            writer.add_tensor(gguf_name(name), w)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_rope_freqs(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as ``rope_freqs`` for a
    Llama 3 RoPE scaling (Meta's published formula)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_from_hf(hf_dir: Path, path: Path, arch: str, **kwargs: Any) -> Path:
    """The transformers checkpoint in ``hf_dir`` written as a GGUF file."""
    import json

    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    tensors = load_file(str(hf_dir / "model.safetensors"))
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    return write_gguf(path, arch, config, tensors, **kwargs)

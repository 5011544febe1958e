"""The project's embedded default model: a small random-weight Llama checkpoint in
Hugging Face format, with a real byte-level BPE tokenizer trained on an embedded corpus.

The weights are random, so generations are gibberish, but every file is laid out exactly
as a Hugging Face Llama checkpoint is, so the engine runs on it the code paths a real
model takes, and tests can compare against ``transformers`` loading the same directory.

Everything is a pure function of ``seed``: the same seed gives byte-identical files
(BPE training in ``tokenizers`` is deterministic, whatever the thread count).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from disagg.errors import ConfigError

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
# The trainer gives special tokens the first ids, in this order.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# A multiple of 8, so the embedding and LM-head matmuls stay on aligned shapes. If the
# corpus ever yields fewer merges, reserved special tokens pad the vocabulary up to it.
VOCAB_SIZE = 2048

# Bump whenever anything that changes the generated files changes (corpus, config,
# initialisation), so that a stale cached copy is never reused.
TINY_MODEL_VERSION = 1
CACHE_DIR_ENV = "DISAGG_CACHE_DIR"

TINY_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
    "initializer_range": 0.02,
    "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
    "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
}


def load_corpus() -> str:
    """The embedded tokenizer-training corpus (``tiny_corpus.txt``, shipped as package data)."""
    return resources.files(__package__).joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(corpus: str, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2/Llama 3 style) of exactly ``vocab_size`` tokens.

    Encoding a single sequence prepends BOS, as Llama 3 does. Every byte is in the initial
    alphabet, so any text round-trips through encode/decode.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size % 8 != 0 or vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ConfigError(
            "vocab_size",
            f"must be a multiple of 8 and at least {len(alphabet) + len(SPECIAL_TOKENS)}, "
            f"got {vocab_size}",
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus], trainer=trainer)

    # A corpus too small to fill the vocabulary: pad with reserved tokens, as Llama 3 does.
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])

    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def init_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random Llama weights under Hugging Face tensor names.

    Linear and embedding weights are N(0, initializer_range); RMSNorm weights are ones.
    Tensors are drawn in a fixed order from one generator, so the seed fixes every value.
    """
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    head_dim = config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]
    std = config["initializer_range"]
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.float32)

    # nn.Linear stores weight as (out_features, in_features).
    weights = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights[f"{p}.input_layernorm.weight"] = ones(hidden)
        weights[f"{p}.self_attn.q_proj.weight"] = normal(q_dim, hidden)
        weights[f"{p}.self_attn.k_proj.weight"] = normal(kv_dim, hidden)
        weights[f"{p}.self_attn.v_proj.weight"] = normal(kv_dim, hidden)
        weights[f"{p}.self_attn.o_proj.weight"] = normal(hidden, q_dim)
        weights[f"{p}.post_attention_layernorm.weight"] = ones(hidden)
        weights[f"{p}.mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[f"{p}.mlp.up_proj.weight"] = normal(inter, hidden)
        weights[f"{p}.mlp.down_proj.weight"] = normal(hidden, inter)
    weights["model.norm.weight"] = ones(hidden)
    weights["lm_head.weight"] = normal(vocab, hidden)
    return weights


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model into ``out_dir`` (created; it must be empty if it exists).

    The files are written into a temporary sibling directory that is renamed into place
    at the end, so a half-written model is never seen under ``out_dir``.
    """
    _check_seed(seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("dir", f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError("dir", f"{out} is not empty; give a new or empty directory")
    if not _write_atomically(out, seed):
        raise ConfigError("dir", f"{out} was filled by another process while writing the model")
    return out


def cache_dir() -> Path:
    """Where generated models are cached: ``$DISAGG_CACHE_DIR``, default ``~/.cache/disagg``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "disagg").expanduser()


def tiny_model_path(seed: int = 0) -> Path:
    """The cached tiny model for ``seed``, generated on first use.

    Safe when processes race: each writes its own staging copy, one rename wins, and the
    others discard theirs and use the winner's (identical) directory.
    """
    _check_seed(seed)
    path = cache_dir() / f"tiny-llama-v{TINY_MODEL_VERSION}-seed{seed}"
    # Non-empty means complete: the directory only ever appears by an atomic rename.
    if path.is_dir() and any(path.iterdir()):
        return path
    _write_atomically(path, seed)
    return path


def _check_seed(seed: int) -> None:
    # torch.Generator takes any 64-bit value but folds negatives onto large positives,
    # so two different seeds would give the same weights.
    if not 0 <= seed < 2**64:
        raise ConfigError("seed", f"must be in [0, 2**64), got {seed}")


def _write_atomically(out: Path, seed: int) -> bool:
    """Write the model to a staging sibling of ``out`` and rename it onto ``out``.

    Returns False, leaving nothing behind, if ``out`` became non-empty in the meantime.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_model_files(staging, seed)
        # mkdtemp (and safetensors) create owner-only entries; the model is not a secret.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        try:
            # POSIX rename replaces an empty directory and fails on a non-empty one.
            staging.rename(out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _write_model_files(out: Path, seed: int) -> None:
    tokenizer = train_tokenizer(load_corpus())
    config = dict(TINY_MODEL_CONFIG)
    # The constants above must describe the tokenizer actually trained.
    actual = {
        "vocab_size": tokenizer.get_vocab_size(),
        "bos_token_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
    }
    for key, value in actual.items():
        if config[key] != value:
            raise RuntimeError(f"tiny model {key} is {config[key]} but the tokenizer gives {value}")
    pad_id = tokenizer.token_to_id(PAD_TOKEN)

    _write_json(out / "config.json", config)
    save_file(init_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    _write_json(out / "special_tokens_map.json", special_tokens_map)
    _write_json(
        out / "tokenizer_config.json",
        {
            # Name the generic class, so that no loader picks a model-specific tokenizer
            # class from config.json's model_type, one that may rewrite the pipeline.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_tokens_map,
            "model_max_length": config["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
        },
    )
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": pad_id,
        },
    )


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

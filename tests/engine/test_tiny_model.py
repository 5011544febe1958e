"""The tiny model is a valid Hugging Face Llama checkpoint: ``transformers`` (the oracle)
loads its weights, config and tokenizer, and the files are a pure function of the seed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from disagg.cli import main as cli_main
from disagg.engine import tiny_model
from disagg.engine.tiny_model import (
    BOS_TOKEN,
    CACHE_DIR_ENV,
    EOS_TOKEN,
    PAD_TOKEN,
    TINY_MODEL_CONFIG,
    TINY_MODEL_VERSION,
    load_corpus,
    make_tiny_model,
    tiny_model_path,
    train_tokenizer,
)
from disagg.errors import ConfigError

transformers = pytest.importorskip("transformers")

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
}

SAMPLES = [
    "The weather today is mild, so take a coat anyway.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    '{"name": "Biscuit", "age": 11, "indoor": false}',
    "Café crème brûlée at 21°C, €12.50 — naïve? 日本語のテキスト 🙂🚲",
    "  leading spaces, trailing tabs\t\t\n\nand blank lines\n",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


def _read_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _assert_no_staging_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.endswith(".tmp")]


# --- the checkpoint, judged by transformers ---------------------------------------------


def test_writes_exactly_the_hugging_face_files(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((model_dir / "config.json").read_text()) == TINY_MODEL_CONFIG
    _assert_no_staging_left(model_dir.parent)


def test_transformers_loads_weights_with_no_missing_or_unexpected_keys(model_dir: Path) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info["error_msgs"]

    # Every tensor transformers holds is the one in the file, not a fresh initialisation.
    ours = load_file(str(model_dir / "model.safetensors"))
    theirs = model.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name

    ids = torch.tensor([[0, 5, 300, 1200, 2047]])
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, vocab)
    assert logits.shape == (1, 5, TINY_MODEL_CONFIG["vocab_size"])
    assert torch.isfinite(logits).all()


def test_transformers_config_matches_ours(model_dir: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    for key, value in TINY_MODEL_CONFIG.items():
        if key == "rope_theta":  # transformers 5 moves it into rope_parameters
            assert config.rope_parameters["rope_theta"] == value
        elif key == "torch_dtype":  # ... and renames this one
            assert config.dtype in (torch.float32, "float32")
        else:
            assert getattr(config, key) == value, key
    assert config.num_attention_heads * config.head_dim == config.hidden_size
    assert config.num_attention_heads % config.num_key_value_heads == 0


def test_weights_follow_the_initialisation_recipe(model_dir: Path) -> None:
    weights = load_file(str(model_dir / "model.safetensors"))
    std = TINY_MODEL_CONFIG["initializer_range"]
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            assert tensor.mean().abs() < 0.1 * std, name
            assert abs(tensor.std().item() - std) < 0.1 * std, name
    assert not torch.equal(weights["model.embed_tokens.weight"], weights["lm_head.weight"])


# --- the tokenizer ------------------------------------------------------------------------


def test_transformers_tokenizer_agrees_with_tokenizers_library(model_dir: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = TINY_MODEL_CONFIG["bos_token_id"]
    for text in SAMPLES:
        ids = hf(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert ids[0] == bos
        assert ids.count(bos) == 1
        assert hf.decode(ids, skip_special_tokens=True) == text
        assert raw.decode(ids) == text  # skips special tokens by default
        assert hf.decode(ids) == BOS_TOKEN + text


def test_tokenizer_special_tokens_and_sizes(model_dir: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    vocab_size = TINY_MODEL_CONFIG["vocab_size"]
    assert vocab_size % 8 == 0
    assert len(hf) == vocab_size
    assert Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size() == vocab_size
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert hf.bos_token_id == TINY_MODEL_CONFIG["bos_token_id"]
    assert hf.eos_token_id == TINY_MODEL_CONFIG["eos_token_id"]
    assert hf.model_max_length == TINY_MODEL_CONFIG["max_position_embeddings"]
    gen = transformers.GenerationConfig.from_pretrained(model_dir)
    assert gen.bos_token_id == hf.bos_token_id
    assert gen.eos_token_id == hf.eos_token_id
    assert gen.pad_token_id == hf.pad_token_id


def test_tokenizer_is_real_bpe(model_dir: Path) -> None:
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = raw.get_vocab()
    for word in ["the", "Ġthe", "Ġweather", "Ġkitchen", "Ġreturn"]:  # Ġ is a byte-level space
        assert word in vocab, word
    ids = raw.encode("the weather", add_special_tokens=False).ids
    assert [raw.id_to_token(i) for i in ids] == ["the", "Ġweather"]
    # Ordinary English compresses to a few bytes per token, far from one token per byte.
    text = "Most Saturdays begin the same way in our house, with the kettle and the radio."
    assert len(raw.encode(text, add_special_tokens=False).ids) < len(text.encode()) / 3


def test_train_tokenizer_pads_a_small_corpus_with_reserved_tokens() -> None:
    tok = train_tokenizer("hello hello world, said the small corpus", vocab_size=512)
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id("<|reserved_0|>") is not None
    text = "anything at all, even ünïcödé"
    assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("vocab_size", [100, 2047])
def test_train_tokenizer_rejects_a_bad_vocab_size(vocab_size: int) -> None:
    with pytest.raises(ConfigError) as err:
        train_tokenizer("some text", vocab_size=vocab_size)
    assert err.value.field == "vocab_size"


def test_corpus_is_embedded_prose_and_code() -> None:
    corpus = load_corpus()
    assert 40_000 <= len(corpus.encode()) <= 80_000
    assert "def " in corpus
    assert '{"' in corpus


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert _read_files(again) == _read_files(model_dir)


def test_same_seed_in_another_process_gives_byte_identical_files(
    model_dir: Path, tmp_path: Path
) -> None:
    # A fresh process has fresh hash seeds (Python's and Rust's), which would expose any
    # dependence of tokenizer training on hash-map iteration order.
    out = tmp_path / "other-process"
    code = "import sys; from disagg.engine.tiny_model import make_tiny_model; make_tiny_model(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
    assert _read_files(out) == _read_files(model_dir)


def test_different_seed_changes_weights_not_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    a, b = _read_files(model_dir), _read_files(other)
    assert a.keys() == b.keys()
    assert {name for name in a if a[name] != b[name]} == {"model.safetensors"}
    wa = load_file(str(model_dir / "model.safetensors"))
    wb = load_file(str(other / "model.safetensors"))
    assert not torch.equal(wa["lm_head.weight"], wb["lm_head.weight"])
    assert torch.equal(wa["model.norm.weight"], wb["model.norm.weight"])


# --- the output directory ---------------------------------------------------------------------


def test_non_empty_out_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError) as err:
        make_tiny_model(out)
    assert err.value.field == "dir"
    assert str(out) in str(err.value)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    _assert_no_staging_left(tmp_path)


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "a-file"
    out.write_text("")
    with pytest.raises(ConfigError) as err:
        make_tiny_model(out)
    assert err.value.field == "dir"


def test_empty_existing_out_dir_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert make_tiny_model(str(out)) == out
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def test_negative_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        make_tiny_model(tmp_path / "m", seed=-1)
    assert err.value.field == "seed"


def _fill_target_while_writing(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Make another 'process' publish ``target`` while ours is still writing its staging copy."""
    real = tiny_model._write_model_files

    def racing(staging: Path, seed: int) -> None:
        real(staging, seed)
        shutil.copytree(staging, target, dirs_exist_ok=True)

    monkeypatch.setattr(tiny_model, "_write_model_files", racing)


def test_make_tiny_model_losing_a_race_raises_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "contested"
    _fill_target_while_writing(monkeypatch, out)
    with pytest.raises(ConfigError) as err:
        make_tiny_model(out)
    assert err.value.field == "dir"
    _assert_no_staging_left(tmp_path)


# --- the cache ----------------------------------------------------------------------------------


def test_tiny_model_path_creates_once_then_reuses(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tiny_model_path()
    assert path == tmp_path / "cache" / f"tiny-llama-v{TINY_MODEL_VERSION}-seed0"
    assert _read_files(path) == _read_files(model_dir)
    _assert_no_staging_left(path.parent)

    def must_not_run(staging: Path, seed: int) -> None:
        raise AssertionError("the cached model was regenerated")

    monkeypatch.setattr(tiny_model, "_write_model_files", must_not_run)
    inode = path.stat().st_ino
    assert tiny_model_path() == path
    assert path.stat().st_ino == inode


def test_tiny_model_path_loser_of_a_race_uses_the_winners_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    target = tmp_path / f"tiny-llama-v{TINY_MODEL_VERSION}-seed3"
    _fill_target_while_writing(monkeypatch, target)
    assert tiny_model_path(seed=3) == target
    assert {p.name for p in target.iterdir()} == EXPECTED_FILES
    _assert_no_staging_left(tmp_path)


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_make_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["make-tiny-model", str(out), "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES

    assert cli_main(["make-tiny-model", str(out)]) == 2
    assert str(out) in capsys.readouterr().err

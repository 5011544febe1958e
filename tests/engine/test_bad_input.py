"""Every mistake a user can make gets a typed exception whose message names the field or
the file to fix, and one bad request never takes the others of a batch down with it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from disagg import LLM, SamplingParams
from disagg.cli import main as cli_main
from disagg.engine.config import EngineConfig
from disagg.errors import (
    CheckpointError,
    ConfigError,
    DisaggError,
    InvalidRequestError,
    UnsupportedArchitectureError,
)
from tests.engine.hf_models import make_hf_checkpoint

VOCAB = 2048  # the tiny model's


@pytest.fixture(scope="module")
def llm() -> LLM:
    # 16 blocks of 16: max_model_len is capped at 256 by the pool.
    return LLM("tiny", num_blocks=16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean checkpoint written by transformers (vocab 384, no tokenizer)."""
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture
def model_copy(hf_dir: Path, tmp_path: Path) -> Path:
    return shutil.copytree(hf_dir, tmp_path / "model")


def load(path: Path, **kwargs: object) -> LLM:
    return LLM(str(path), num_blocks=8, **kwargs)


# --- the model directory ------------------------------------------------------------------


def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="not a directory") as err:
        load(missing)
    assert err.value.path == str(missing) and str(missing) in str(err.value)


def test_missing_config_json(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load(model_copy)
    assert err.value.path == str(model_copy / "config.json")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b""])
def test_config_json_that_is_not_a_json_object(model_copy: Path, content: bytes) -> None:
    (model_copy / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load(model_copy)
    assert err.value.path == str(model_copy / "config.json")


def edit_config(model: Path, **changes: object) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture_lists_the_supported_ones(model_copy: Path) -> None:
    edit_config(model_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError) as err:
        load(model_copy)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in message


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"hidden_size": "big"}, "config.json"),
        ({"vocab_size": None}, "config.json"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ],
)
def test_config_json_with_a_bad_field(model_copy: Path, changes: dict, named: str) -> None:
    edit_config(model_copy, **changes)
    with pytest.raises(CheckpointError) as err:
        load(model_copy)
    assert err.value.path == str(model_copy / "config.json")
    assert named in str(err.value)


def test_a_required_config_field_missing_is_named(model_copy: Path) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    del config["intermediate_size"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="intermediate_size"):
        load(model_copy)


def test_missing_weights(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as err:
        load(model_copy)
    assert err.value.path == str(model_copy)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "corrupt",
    [
        truncate,
        lambda p: p.write_bytes(p.read_bytes()[:5]),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"\x00garbage" * 100),
        lambda p: p.write_bytes(
            (40).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [2]}}'
        ),
    ],
    ids=["truncated", "shorter than a header", "empty", "garbage", "bad header"],
)
def test_corrupt_weights_file_is_named(model_copy: Path, corrupt: Callable[[Path], None]) -> None:
    weights = model_copy / "model.safetensors"
    corrupt(weights)
    with pytest.raises(CheckpointError) as err:
        load(model_copy)
    assert err.value.path == str(weights)


@pytest.fixture
def sharded(tmp_path: Path, hf_dir: Path) -> Path:
    """The same weights as ``hf_dir``, in three shards with an index."""
    out = shutil.copytree(hf_dir, tmp_path / "sharded")
    (out / "model.safetensors").unlink()
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[i::3]}
        save_file(part, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def test_sharded_checkpoint_loads(sharded: Path) -> None:
    assert load(sharded).generate([5, 6, 7], SamplingParams(max_tokens=2))[0].error is None


def test_sharded_index_naming_a_missing_shard(sharded: Path) -> None:
    missing = sharded / "model-00002-of-00003.safetensors"
    missing.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json") as err:
        load(sharded)
    assert err.value.path == str(missing)


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        '{"metadata": {}}',
        '{"weight_map": ["model.safetensors"]}',
        '{"weight_map": {"x": 3}}',
    ],
    ids=["not json", "no weight_map", "weight_map a list", "file name not a string"],
)
def test_sharded_index_that_is_malformed(sharded: Path, index: str) -> None:
    (sharded / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError) as err:
        load(sharded)
    assert err.value.path == str(sharded / "model.safetensors.index.json")


def test_a_corrupt_shard_is_named(sharded: Path) -> None:
    shard = sharded / "model-00003-of-00003.safetensors"
    truncate(shard)
    with pytest.raises(CheckpointError) as err:
        load(sharded)
    assert err.value.path == str(shard)


def rewrite_weights(model: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        # Fused into one parameter by the engine; the message must still name the
        # checkpoint's own tensor, the one the user can look for.
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
    ],
)
def test_a_missing_tensor_is_named(model_copy: Path, name: str) -> None:
    rewrite_weights(model_copy, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing") as err:
        load(model_copy)
    assert name in str(err.value)


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ],
)
def test_a_tensor_with_the_wrong_shape_is_named(model_copy: Path, name: str) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, 3)

    rewrite_weights(model_copy, edit)
    with pytest.raises(CheckpointError, match="shape") as err:
        load(model_copy)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("content", [b"{}", b"not json at all", b'{"model": {"type": "Nonsense"}}'])
def test_invalid_tokenizer_json(model_copy: Path, content: bytes) -> None:
    (model_copy / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load(model_copy)
    assert err.value.path == str(model_copy / "tokenizer.json")


def test_invalid_generation_config_json(model_copy: Path) -> None:
    (model_copy / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError) as err:
        load(model_copy)
    assert err.value.path == str(model_copy / "generation_config.json")


# --- engine settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"device": "tpu"}, "device"),
        ({"device": ""}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": "fp16"}, "dtype"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -16}, "block_size"),
        ({"block_size": 16.0}, "block_size"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"kv_cache_memory": -1}, "kv_cache_memory"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ],
)
def test_engine_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        EngineConfig(**kwargs)
    assert err.value.field == field and str(err.value).startswith(f"{field}:")
    with pytest.raises(ConfigError) as err:
        LLM("tiny", **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "lifo"}, "policy"),
        ({"max_model_len": 10**6}, "max_model_len"),
        ({"kv_cache_memory": 100, "num_blocks": None}, "kv_cache_memory"),
    ],
)
def test_settings_checked_against_the_model(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        LLM("tiny", **{"num_blocks": 4, **kwargs})
    assert err.value.field == field


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        LLM("tiny", device="cuda", num_blocks=4)
    assert err.value.field == "device" and "CUDA" in str(err.value)


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="fcfs"):
        LLM("tiny", policy="round-robin", num_blocks=4)


# --- sampling parameters ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": "5"}, "top_k"),
        ({"seed": 1.0}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"top_p": 1},
        {"top_k": 0},
        {"seed": 0},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"stop": None, "stop_token_ids": None},
        {"stop": "x"},
        {"max_tokens": 1},
    ],
)
def test_valid_edge_sampling_params_are_accepted(kwargs: dict) -> None:
    params = SamplingParams(**kwargs)
    assert isinstance(params.stop, tuple) and isinstance(params.stop_token_ids, tuple)


def test_extreme_but_valid_seeds_run(llm: LLM) -> None:
    params = [SamplingParams(max_tokens=2, seed=s) for s in (2**64 - 1, -(2**63))]
    outs = llm.generate(["a", "b"], params)
    assert [o.error for o in outs] == [None, None]
    assert [len(o.token_ids) for o in outs] == [2, 2]


# --- prompts ------------------------------------------------------------------------------

LONG = 256  # the tiny fixture's max_model_len (its 16 x 16 token pool)

BAD_PROMPTS = [
    ("", "prompt"),
    ([], "prompt_token_ids"),
    ([5, -1], "prompt_token_ids"),
    ([5, VOCAB], "prompt_token_ids"),
    ([5, 2.0], "prompt_token_ids"),
    ([5, "6"], "prompt_token_ids"),
    ([5, None], "prompt_token_ids"),
    ([True, 5], "prompt_token_ids"),
    ([7] * LONG, "prompt_token_ids"),
    ("word " * 400, "prompt"),
    (5, "prompt"),
    (None, "prompt"),
    ({"text": "hi"}, "prompt"),
    (b"bytes", "prompt"),
]
BAD_IDS = [
    "empty str",
    "empty ids",
    "negative id",
    "id = vocab",
    "float id",
    "str id",
    "None id",
    "bool id",
    "ids fill the context",
    "text over the context",
    "int",
    "None",
    "dict",
    "bytes",
]


@pytest.mark.parametrize(("prompt", "field"), BAD_PROMPTS, ids=BAD_IDS)
def test_bad_prompt_via_add_request(llm: LLM, prompt: object, field: str) -> None:
    engine = llm.engine
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(prompt)
    assert err.value.field == field
    assert not engine.has_unfinished()  # nothing was queued


@pytest.mark.parametrize(("prompt", "field"), BAD_PROMPTS, ids=BAD_IDS)
def test_bad_prompt_via_generate(llm: LLM, prompt: object, field: str) -> None:
    # Next to a good prompt, so that even prompts that are no prompt at all (5, None)
    # come in a list; alone they are rejected whole (see below).
    outs = llm.generate(["Hello", prompt], SamplingParams(max_tokens=2))
    assert len(outs) == 2
    good, bad = outs
    assert good.error is None and good.finish_reason == "length" and len(good.token_ids) == 2
    assert isinstance(bad.error, InvalidRequestError) and bad.error.field == field
    assert bad.finish_reason == "error" and bad.token_ids == [] and bad.text == ""


def test_a_prompt_over_the_model_context_names_it(hf_dir: Path) -> None:
    # A pool larger than the model's 1024-position context: the context is the limit.
    llm = LLM(str(hf_dir), num_blocks=128)
    assert llm.engine.max_model_len == 1024
    with pytest.raises(InvalidRequestError, match="model context 1024") as err:
        llm.engine.add_request([5] * 1500)
    assert err.value.field == "prompt_token_ids"
    with pytest.raises(InvalidRequestError, match="max_model_len is 1024"):
        llm.engine.add_request([5] * 1024)  # leaves no room for a single token
    assert len(llm.generate([5] * 1023, SamplingParams(max_tokens=5))[0].token_ids) == 1


def test_a_prompt_over_the_kv_pool_names_it(hf_dir: Path) -> None:
    llm = LLM(str(hf_dir), num_blocks=2, block_size=16)
    out = llm.generate([[5] * 40], SamplingParams(max_tokens=2))[0]
    assert isinstance(out.error, InvalidRequestError) and out.error.field == "prompt_token_ids"
    assert "KV pool 32 tokens" in str(out.error)


def test_a_text_prompt_to_a_model_without_tokenizer(hf_dir: Path) -> None:
    llm = load(hf_dir)
    with pytest.raises(InvalidRequestError, match="tokenizer") as err:
        llm.engine.add_request("hello")
    assert err.value.field == "prompt"


@pytest.mark.parametrize("prompts", [5, None, {"a": 1}, 2.5])
def test_generate_with_no_prompt_at_all_raises(llm: LLM, prompts: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompts)
    assert err.value.field == "prompts"


def test_a_flat_id_list_with_a_bad_entry_is_one_bad_prompt(llm: LLM) -> None:
    # [5, 2.5] is one token-id prompt with a bad id, not two prompts "5" and "2.5".
    outs = llm.generate([5, 2.5], SamplingParams(max_tokens=2))
    assert len(outs) == 1
    assert outs[0].error is not None and outs[0].error.field == "prompt_token_ids"
    assert "2.5" in str(outs[0].error)


def test_sampling_params_list_length_mismatch(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="3 given for 2 prompts") as err:
        llm.generate(["a", "b"], [SamplingParams()] * 3)
    assert err.value.field == "sampling_params"
    assert not llm.engine.has_unfinished()


def test_sampling_params_of_the_wrong_type(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError) as err:
        llm.engine.add_request("hi", {"temperature": 0})  # type: ignore[arg-type]
    assert err.value.field == "sampling_params"
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=1), "greedy"])  # type: ignore[list-item]
    assert outs[0].error is None and outs[1].error.field == "sampling_params"


@pytest.mark.parametrize("stop", [VOCAB, VOCAB + 100])
def test_stop_token_ids_outside_the_vocabulary(llm: LLM, stop: int) -> None:
    params = SamplingParams(stop_token_ids=[3, stop])
    with pytest.raises(InvalidRequestError, match=str(stop)) as err:
        llm.engine.add_request("hi", params)
    assert err.value.field == "stop_token_ids"
    out = llm.generate(["hi"], params)[0]
    assert out.error is not None and out.error.field == "stop_token_ids"


def test_bad_requests_do_not_change_the_good_ones(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    good = ["The tide", "A morning"]
    alone = [llm.generate(p, s)[0].token_ids for p, s in zip(good, [greedy, seeded], strict=True)]

    prompts = ["", good[0], [VOCAB + 1], good[1], "x", [1] * LONG]
    params = [greedy, greedy, greedy, seeded, SamplingParams(stop_token_ids=[VOCAB]), greedy]
    outs = llm.generate(prompts, params)
    assert [o.finish_reason for o in outs] == [
        "error",
        "length",
        "error",
        "length",
        "error",
        "error",
    ]
    assert [outs[1].token_ids, outs[3].token_ids] == alone
    assert all(isinstance(outs[i].error, DisaggError) for i in (0, 2, 4, 5))
    llm.engine.allocator.check_integrity()
    assert llm.engine.allocator.num_free == 16


# --- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["missing", "not json", "unsupported"])
def test_cli_reports_a_bad_model_dir_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    model = tmp_path / "model"
    if problem != "missing":
        model.mkdir()
        config = (
            "{" if problem == "not json" else json.dumps({"architectures": ["GPT2LMHeadModel"]})
        )
        (model / "config.json").write_text(config)
    code = cli_main(["demo", "--model", str(model), "--num-prompts", "1", "--max-tokens", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("disagg demo: error: ")
    assert str(model) in captured.err or "GPT2LMHeadModel" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_unknown_engine_setting_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="num_block") as info:
        LLM("tiny", num_block=8)
    assert info.value.field == "num_block"

"""End-to-end generation through ``LLM``: prompts in, tokens and text out, every stop
condition, abort, and the KV pool's bookkeeping afterwards."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from disagg import LLM, SamplingParams
from disagg.engine.engine import resolve_model_dir
from tests.engine.hf_models import make_hf_checkpoint

PROMPTS = ["The tide comes in", "A quiet morning in the mountains", "def add(a, b):", "Bread rises"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
NUM_BLOCKS = 128


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", num_blocks=NUM_BLOCKS)


@pytest.fixture(autouse=True)
def pool_is_clean_after_each_test(llm: LLM) -> Iterator[None]:
    yield
    allocator = llm.engine.allocator
    allocator.check_integrity()
    assert allocator.num_free == allocator.num_blocks == NUM_BLOCKS
    assert not llm.engine.has_unfinished()


@pytest.fixture(scope="module")
def baseline(llm: LLM) -> list[list[int]]:
    """Greedy tokens of each prompt, generated alone."""
    return [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def decode(llm: LLM, ids: list[int]) -> str:
    assert llm.tokenizer is not None
    return llm.tokenizer.decode(ids)


# --- prompts in, outputs out --------------------------------------------------------------


def test_text_prompts_are_encoded_by_the_checkpoint_tokenizer_with_bos(llm: LLM) -> None:
    prompts = ["Hello world", "Café crème 🙂 日本語", "  two  spaces\n"]
    reference = HFTokenizer.from_file(str(resolve_model_dir("tiny") / "tokenizer.json"))
    outs = llm.generate(prompts, SamplingParams(max_tokens=1))
    bos = llm.engine.model_config.bos_token_id
    assert bos is not None
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.prompt == prompt
        assert out.prompt_token_ids == reference.encode(prompt).ids
        assert out.prompt_token_ids[0] == bos and bos not in out.prompt_token_ids[1:]
        assert reference.decode(out.prompt_token_ids) == prompt


def test_outputs_come_back_in_input_order(llm: LLM, baseline: list[list[int]]) -> None:
    # Different max_tokens make them finish in a different order than they were given.
    lengths = [12, 1, 7, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(PROMPTS, params)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.token_ids for o in outs] == [b[:n] for b, n in zip(baseline, lengths, strict=True)]
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)
    assert [o.text for o in outs] == [decode(llm, o.token_ids) for o in outs]
    for o in outs:
        assert o.arrival_time <= o.first_token_time <= o.finish_time


def test_a_single_string_is_one_prompt(llm: LLM, baseline: list[list[int]]) -> None:
    outs = llm.generate(PROMPTS[0], GREEDY)
    assert len(outs) == 1 and outs[0].token_ids == baseline[0]


def test_a_flat_list_of_ints_is_one_prompt(llm: LLM, baseline: list[list[int]]) -> None:
    ids = llm.tokenizer.encode(PROMPTS[0])
    outs = llm.generate(ids, GREEDY)
    assert len(outs) == 1
    assert outs[0].prompt is None and outs[0].prompt_token_ids == ids
    assert outs[0].token_ids == baseline[0]


def test_an_empty_prompt_list_gives_no_outputs(llm: LLM) -> None:
    assert llm.generate([], GREEDY) == []


# --- stopping -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 5, 24])
def test_max_tokens_ends_with_length(llm: LLM, baseline: list[list[int]], max_tokens: int) -> None:
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    assert out.token_ids == baseline[2][:max_tokens]
    assert out.finish_reason == "length"


def first_new_token_at_or_after(tokens: list[int], k: int) -> int:
    """Index of the first token at position >= k that did not occur before it."""
    return next(i for i in range(k, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids_end_the_output_right_there(llm: LLM, baseline: list[list[int]]) -> None:
    k = first_new_token_at_or_after(baseline[0], 3)
    stop = baseline[0][k]
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop, 2047])
    )[0]
    assert out.token_ids == baseline[0][: k + 1]
    assert out.finish_reason == "stop"
    # ignore_eos is about the end-of-sequence token only; stop tokens still stop.
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], ignore_eos=True),
    )[0]
    assert out.token_ids == baseline[0][: k + 1]


def stop_string_cases(llm: LLM, tokens: list[int]) -> list[str]:
    text = decode(llm, tokens)
    start = len(decode(llm, tokens[:3]))  # where token 3's text begins
    boundary = len(decode(llm, tokens[:2]))  # between tokens 1 and 2
    return [text[start : start + 4], text[boundary - 3 : boundary + 3]]


@pytest.mark.parametrize("case", [0, 1], ids=["at a token start", "spanning two tokens"])
def test_stop_strings_cut_the_text_before_them(
    llm: LLM, baseline: list[list[int]], case: int
) -> None:
    tokens = baseline[0]
    full = decode(llm, tokens)
    stop = stop_string_cases(llm, tokens)[case]
    cut = full.find(stop)
    assert stop.strip() and "\ufffd" not in stop and cut > 0, (stop, full)  # a fair test case

    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:cut]
    n = len(out.token_ids)
    assert out.token_ids == tokens[:n]
    # It stopped at the first token that completed the stop string, not later.
    assert stop in decode(llm, out.token_ids) and stop not in decode(llm, out.token_ids[:-1])


def test_the_earliest_of_several_stop_strings_wins(llm: LLM, baseline: list[list[int]]) -> None:
    full = decode(llm, baseline[0])
    late, early = stop_string_cases(llm, baseline[0])
    assert full.find(early) < full.find(late)
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=0, max_tokens=24, stop=[late, "zzzz-not-there", early]),
    )[0]
    assert out.text == full[: full.find(early)] and out.finish_reason == "stop"


def test_a_stop_string_never_produced_changes_nothing(llm: LLM, baseline: list[list[int]]) -> None:
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, stop="qqqqq"))[0]
    assert out.token_ids == baseline[1] and out.finish_reason == "length"
    assert out.text == decode(llm, baseline[1])


def test_max_model_len_caps_generation() -> None:
    small = LLM("tiny", num_blocks=16, max_model_len=20)
    out = small.generate(
        "Hello world", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    )[0]
    assert len(out.prompt_token_ids) + len(out.token_ids) == 20
    assert out.finish_reason == "length"
    small.engine.allocator.check_integrity()
    assert small.engine.allocator.num_free == 16


# --- end of sequence, on a checkpoint written by transformers -----------------------------

HF_PROMPT = [5, 17, 42, 99, 7, 250]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def hf_baseline(hf_dir: Path) -> list[int]:
    out = LLM(str(hf_dir), num_blocks=32).generate(HF_PROMPT, GREEDY)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 24
    return out.token_ids


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_eos_stops_generation_unless_ignore_eos(
    hf_dir: Path, hf_baseline: list[int], tmp_path: Path, where: str
) -> None:
    # Declare as EOS a token that greedy decoding produces at step k.
    k = first_new_token_at_or_after(hf_baseline, 3)
    eos = hf_baseline[k]
    model = shutil.copytree(hf_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    if where == "generation_config.json":
        (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [383, eos]}))
        config["eos_token_id"] = 383  # generation_config.json takes precedence
    else:
        (model / "generation_config.json").unlink()
        config["eos_token_id"] = eos
    (model / "config.json").write_text(json.dumps(config))

    llm = LLM(str(model), num_blocks=32)
    assert eos in llm.engine.eos_token_ids
    out = llm.generate(HF_PROMPT, SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.token_ids == hf_baseline[: k + 1] and out.finish_reason == "stop"
    out = llm.generate(HF_PROMPT, GREEDY)[0]
    assert out.token_ids == hf_baseline and out.finish_reason == "length"


def test_a_small_pool_caps_max_model_len_and_preempts_without_changing_tokens(
    hf_dir: Path, hf_baseline: list[int]
) -> None:
    # 6 blocks of 4 tokens: max_model_len is capped at 24, and four requests cannot all
    # grow at once, so some are preempted and recomputed.
    llm = LLM(str(hf_dir), num_blocks=6, block_size=4)
    assert llm.engine.max_model_len == 24
    outs = llm.generate(
        [HF_PROMPT] * 4, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    )
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(o.num_preemptions > 0 for o in outs)
    for o in outs:
        assert o.token_ids == hf_baseline[: 24 - len(HF_PROMPT)]
        assert o.finish_reason == "length"
    llm.engine.allocator.check_integrity()
    assert llm.engine.allocator.num_free == 6


# --- abort and the KV pool ----------------------------------------------------------------


def test_abort_frees_the_blocks_of_running_and_waiting_requests(
    llm: LLM, baseline: list[list[int]]
) -> None:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    running = [engine.add_request(p, params) for p in PROMPTS[:3]]
    engine.step()  # prefill: all three hold blocks now
    assert engine.allocator.num_free < NUM_BLOCKS
    waiting = engine.add_request(PROMPTS[3], params)
    held = len(running[1].block_table)
    free_before = engine.allocator.num_free

    assert engine.abort(running[1].seq_id)
    assert engine.allocator.num_free == free_before + held
    assert engine.abort(waiting.seq_id)
    assert not engine.abort(waiting.seq_id)  # already gone
    assert not engine.abort(10_000)
    assert running[1].finish_reason == waiting.finish_reason == "abort"
    assert running[1].block_table == [] and waiting.block_table == []

    finished = []
    while engine.has_unfinished():
        finished += engine.step()
    assert set(finished) == {running[0], running[2]}
    assert running[0].output_token_ids == baseline[0][:10]
    assert running[2].output_token_ids == baseline[2][:10]
    assert waiting.output_token_ids == []


def test_kv_pool_sized_by_bytes_holds_budget_over_block_bytes() -> None:
    # Tiny model: 4 layers, 2 KV heads of 32 dims, float32 on CPU; K and V per token slot.
    block_size = 8
    bytes_per_block = 2 * 4 * block_size * 2 * 32 * 4
    budget = 13 * bytes_per_block + bytes_per_block - 1
    llm = LLM("tiny", kv_cache_memory=budget, block_size=block_size)
    assert llm.engine.kv_cache.spec.bytes_per_block == bytes_per_block
    assert llm.engine.kv_cache.num_blocks == llm.engine.allocator.num_blocks == 13
    assert llm.engine.kv_cache.data.numel() * 4 == 13 * bytes_per_block
    assert llm.engine.max_model_len == 13 * block_size

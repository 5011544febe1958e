"""Planning workloads (presets and trace files) and model/GPU resolution."""

from __future__ import annotations

import json

import pytest

from disagg.errors import ConfigError
from disagg.planner.presets import (
    WORKLOADS,
    load_plan_workload,
    resolve_gpu,
    resolve_model,
)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_presets_respect_their_bounds_and_are_deterministic(name):
    w = load_plan_workload(name, 500, seed=3)
    preset = WORKLOADS[name]
    assert len(w) == 500
    assert all(preset.prompt.low <= p <= preset.prompt.high for p in w.prompt_lens)
    assert all(1 <= o <= preset.output.high for o in w.output_lens)
    assert w.max_total <= preset.max_total
    assert load_plan_workload(name, 500, seed=3) == w
    assert load_plan_workload(name, 500, seed=4) != w


def test_rates_scale_the_same_requests():
    w = load_plan_workload("chatbot-like", 100)
    slow, fast = w.at_rate(1.0, drain=5.0), w.at_rate(4.0, drain=5.0)
    assert [a.prompt_len for a in slow.arrivals] == [a.prompt_len for a in fast.arrivals]
    assert fast.arrivals[-1].time == pytest.approx(slow.arrivals[-1].time / 4)
    assert fast.duration == pytest.approx(fast.arrivals[-1].time + 5.0)
    # Poisson at 1 req/s: 100 arrivals take about 100 s.
    assert 70 < slow.arrivals[-1].time < 130


def test_summarization_prompts_are_long_and_code_prompts_short():
    summ = load_plan_workload("summarization-like", 300)
    code = load_plan_workload("code-completion-like", 300)
    assert summ.mean_prompt > 5 * code.mean_prompt
    assert summ.mean_output < summ.mean_prompt


def test_trace_with_start_times_keeps_its_shape(tmp_path):
    path = tmp_path / "t.json"
    entries = [
        {"prompt_len": 10 + i, "output_len": 5, "start_time": t}
        for i, t in enumerate([0.0, 0.5, 0.5, 4.0])
    ]
    path.write_text(json.dumps(entries))
    w = load_plan_workload(str(path), 100)
    assert w.prompt_lens == (10, 11, 12, 13)
    # gaps 0, .5, 0, 3.5 scaled to mean 1 over the 3 intervals: x 3/4
    assert w.unit_gaps == pytest.approx((0.0, 0.375, 0.0, 2.625))


def test_trace_without_start_times_is_poisson(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"prompt_len": 100, "output_len": 50}] * 40))
    w = load_plan_workload(str(path), 30)
    assert len(w) == 30 and w.mean_output == 50
    assert len(set(w.unit_gaps)) == 30


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ([{"prompt_len": 0, "output_len": 5}], "t.json:0.prompt_len"),
        ([{"prompt_len": 5, "output_len": "x"}], "t.json:0.output_len"),
        ([{"prompt_len": 5, "output_len": 5, "colour": 1}], "t.json:0.colour"),
        ([{"prompt_len": 5, "output_len": 5, "start_time": -1}], "t.json:0.start_time"),
        ([], "t.json"),
    ],
)
def test_bad_trace_entries_name_the_field(tmp_path, entries, field):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ConfigError) as info:
        load_plan_workload(str(path), 100)
    assert info.value.field.endswith(field)


def test_unknown_presets_list_the_known_ones():
    with pytest.raises(ConfigError, match="chatbot-like, code-completion-like"):
        load_plan_workload("chat", 100)
    with pytest.raises(ConfigError, match="opt-13b, opt-66b, opt-175b, llama-2-7b"):
        resolve_model("gpt-9")
    with pytest.raises(ConfigError, match="a100-80g, h100-80g, h200, a10g, l4"):
        resolve_gpu("v100")


def test_a_hugging_face_config_is_a_model(tmp_path):
    config = {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "num_hidden_layers": 40,
        "hidden_size": 5120,
        "ffn_dim": 20480,
        "num_attention_heads": 40,
        "vocab_size": 50272,
        "torch_dtype": "float16",
    }
    path = tmp_path / "opt13" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    shape = resolve_model(str(path))
    assert shape.num_layers == 40
    assert shape.kv_bytes_per_token == resolve_model("opt-13b").kv_bytes_per_token

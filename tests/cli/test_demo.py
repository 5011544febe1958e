"""The README's main job runs and reports what it measured."""

from __future__ import annotations

import re

import pytest

from disagg.cli import main


def test_demo_prints_outputs_and_throughput(capsys):
    assert (
        main(["demo", "--offline", "--model", "tiny", "--num-prompts", "3", "--max-tokens", "5"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("\n  -> ") == 3
    match = re.search(
        r"3 requests: (\d+) prompt \+ (\d+) generated tokens .* ([\d.]+) generated tokens/s", out
    )
    assert match is not None, out
    assert int(match.group(2)) == 15
    assert float(match.group(3)) > 0


def test_served_demo_prints_a_table_per_policy(capsys):
    assert main(["demo", "--model", "tiny", "--duration", "3"]) == 0
    out = capsys.readouterr().out
    for policy in ("fcfs", "two-stage-vtc"):
        assert f"\n{policy}\n" in out
    rows = re.findall(r"^  (heavy|light-1|light-2) +(\d+) +(\d+) +(\d+)", out, re.M)
    assert len(rows) == 6, out
    assert all(int(requests) > 0 for _, _, requests, _ in rows), out
    # Each client's first question and its answer are shown under each table.
    assert out.count("  heavy asked 'Explain in detail") == 2, out


@pytest.mark.parametrize("native", [True, False])
def test_demo_dtype_auto_is_bfloat16_only_for_a_trained_model_on_a_bf16_cpu(monkeypatch, native):
    from disagg import showcase

    monkeypatch.setattr(showcase, "cpu_has_bfloat16", lambda: native)
    assert showcase.demo_dtype("smollm2-135m-instruct", "auto") == (
        "bfloat16" if native else "auto"
    )
    assert showcase.demo_dtype("tiny", "auto") == "auto"
    assert showcase.demo_dtype("smollm2-135m-instruct", "float32") == "float32"
    assert showcase.demo_dtype("smollm2-135m-instruct", "auto", device="cuda") == "auto"

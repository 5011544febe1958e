"""The README's main job runs and reports what it measured."""

from __future__ import annotations

import re

from disagg.cli import main


def test_demo_prints_outputs_and_throughput(capsys):
    assert main(["demo", "--num-prompts", "3", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n  -> ") == 3
    match = re.search(
        r"3 requests: (\d+) prompt \+ (\d+) generated tokens .* ([\d.]+) generated tokens/s", out
    )
    assert match is not None, out
    assert int(match.group(2)) == 15
    assert float(match.group(3)) > 0

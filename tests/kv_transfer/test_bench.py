"""``python -m bench.kv_transfer`` runs end to end (one small case, one repeat)."""

from __future__ import annotations

from bench.kv_transfer import Case, print_table, run


def test_benchmark_runs_and_reports_a_row(capsys):
    case = Case("smoke", num_layers=2, num_kv_heads=2, head_dim=32, dtype="bfloat16", tokens=100)
    (row,) = run("gloo", [case], repeats=2, threads=1, depth=3)
    assert row.case == "smoke" and row.mib == case.nbytes / 2**20
    assert row.paged_gbps > 0 and row.raw_gbps > 0 and row.gather_gbps > 0
    print_table("smoke", [row], profile=True)
    assert "smoke" in capsys.readouterr().out

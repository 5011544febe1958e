"""``disagg profile``: the fit recovers known coefficients and stays non-negative, the
tiny model's profile round-trips through the file the simulator and planner read, and
what cannot be profiled is refused with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from disagg.cli import main
from disagg.errors import ConfigError
from disagg.planner.fit import Sample, decode_contexts, fit_decode, fit_prefill, nnls_relative
from disagg.planner.timing import ProfileGrid, profile_engine
from disagg.sim.latency import load_profile, save_profile


def test_nnls_recovers_exact_coefficients():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(20), rng.uniform(10, 5000, 20), rng.uniform(1e2, 1e7, 20)])
    truth = np.array([3.0, 0.08, 6e-5])
    assert nnls_relative(x, x @ truth) == pytest.approx(truth, rel=1e-6)


def test_nnls_never_returns_a_negative_coefficient():
    # Times that fall with the second feature: least squares would make b negative.
    x = np.column_stack([np.ones(6), np.arange(1.0, 7.0), np.arange(1.0, 7.0) ** 2])
    t = np.array([10.0, 9.0, 8.5, 8.2, 8.1, 8.05])
    coef = nnls_relative(x, t)
    assert (coef >= 0).all()
    assert coef[0] > 0  # the intercept carries what the slopes may not


def test_prefill_fit_on_the_distserve_form():
    a, b, c = 4.0, 0.08, 1e-4
    samples = [
        Sample(bs, n, a + b * bs * n + c * bs * n * n) for bs in (1, 2, 4) for n in (16, 128, 512)
    ]
    fit = fit_prefill(samples)
    assert fit.coef == pytest.approx((a, b, c), rel=1e-6)
    assert fit.max_error < 1e-9


def _decode_sample(bs: int, ctx: int, coef: tuple[float, float, float]) -> Sample:
    a, b, c = coef
    return Sample(bs, ctx, a + b * sum(decode_contexts(bs, ctx)) + c * bs)


def test_decode_splits_where_the_regime_changes():
    small, large = (3.0, 5e-4, 0.1), (1.0, 5e-4, 0.4)
    samples = [
        _decode_sample(bs, ctx, small if bs <= 16 else large)
        for bs in (1, 4, 8, 16, 32, 64, 128)
        for ctx in (64, 512)
    ]
    pieces = fit_decode(samples)
    assert [cut for cut, _ in pieces] == [16, None]
    assert pieces[0][1].coef == pytest.approx(small, rel=1e-5)
    assert pieces[1][1].coef == pytest.approx(large, rel=1e-5)


def test_decode_keeps_one_piece_for_one_regime():
    samples = [
        _decode_sample(bs, ctx, (3.0, 5e-4, 0.1)) for bs in (1, 4, 16, 64) for ctx in (64, 512)
    ]
    assert [cut for cut, _ in fit_decode(samples)] == [None]


def test_decode_contexts_average_the_grid_context():
    for bs, ctx in ((1, 100), (8, 256), (33, 1000)):
        lens = decode_contexts(bs, ctx)
        assert len(lens) == bs and max(lens) < 2 * ctx
        assert sum(lens) == pytest.approx(bs * ctx, rel=0.01)


GRID = ProfileGrid(prefill=((1, 16), (2, 32), (1, 96)), decode=((1, 32), (4, 64), (8, 32)))


def test_tiny_profile_round_trips_and_serves_the_simulator(tmp_path):
    result = profile_engine("tiny", "cpu", grid=GRID, repeats=1, progress=False)
    path = tmp_path / "profile.json"
    save_profile(result.profile, path)
    loaded = load_profile(path)
    assert loaded == result.profile
    entry = loaded.tp["1"]
    assert loaded.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4  # layers, K+V, KV heads, dim, fp32
    assert entry.kv_capacity_tokens > 0 and entry.kv_capacity_tokens % 16 == 0
    assert set(entry.fit_error) == {"prefill_median", "prefill_max", "decode_median", "decode_max"}
    # The file's model predicts the grid it was fitted to within its own recorded error.
    model = loaded.model(1)
    for s in result.prefill_samples:
        t = model.prefill_time(s.tokens, s.batch_size * s.length**2, s.batch_size) * 1e3
        assert abs(t - s.ms) / s.ms <= entry.fit_error["prefill_max"] + 1e-9
    assert model.decode_time(8, 256) > model.decode_time(1, 32) > 0


def test_cli_writes_a_profile_the_simulator_reads(tmp_path, capsys, monkeypatch):
    import disagg.planner.profile as profile_module

    monkeypatch.setattr(profile_module, "QUICK_GRID", dict(
        prefill_batches=(1, 2), prefill_lens=(16, 48), decode_batches=(1, 4), decode_contexts=(32, 64),
    ))  # fmt: skip
    out = tmp_path / "p.json"
    assert main(["profile", "--quick", "--repeats", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "relative error median" in printed.out
    assert "decode" in printed.err  # the progress bar
    data = json.loads(out.read_text())
    assert data["unit"] == "ms" and "1" in data["tp"]
    spec = tmp_path / "w.json"
    spec.write_text(json.dumps({"duration": 5, "seed": 0, "clients": [
        {"id": "a", "arrival": "poisson", "rate": 4, "input_len": 64, "output_len": 16},
    ]}))  # fmt: skip
    argv = ["simulate", "--workload", str(spec), "--policy", "two-stage-vtc", "--cluster",
            "disagg", "--latency-profile", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    # At 4 req/s a 64-token prompt rarely waits: its TTFT is the profile's prefill time.
    lone = load_profile(out).model(1).prefill_time(64, 64 * 64, 1)
    assert report["clients"]["a"]["ttft_p50"] == pytest.approx(lone, rel=1e-6)


@pytest.mark.slow  # starts two rank processes
def test_tensor_parallel_profile_times_the_parallel_engine():
    result = profile_engine(tp=2, grid=GRID, repeats=1, num_blocks=64, progress=False)
    assert list(result.profile.tp) == ["2"]
    assert all(s.ms > 0 for s in result.prefill_samples + result.decode_samples)
    # The whole model's KV per token, as at tp = 1 (tiny: 4 layers x 2 KV heads x 32).
    assert result.profile.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4
    assert result.profile.tp["2"].kv_capacity_tokens == 64 * 16


@pytest.mark.slow  # starts two rank processes
def test_pipeline_parallel_profile_records_the_pp_pool_and_serves_the_model_at_pp(tmp_path):
    result = profile_engine(pp=2, grid=GRID, repeats=1, num_blocks=64, progress=False)
    entry = result.profile.tp["1"]
    assert entry.kv_capacity_tokens_by_pp == {"2": 64 * 16}
    assert entry.kv_capacity_tokens == 64 * 16 // 2  # estimated, and said so
    assert "pp 2" in result.profile.sources["layout"]
    assert "estimated" in result.profile.sources["kv_capacity_tokens"]
    out = tmp_path / "pp2.json"
    save_profile(result.profile, out)
    at_pp2 = load_profile(out).model(1, 2)  # the latency model reads the pp pool
    assert at_pp2.kv_capacity_tokens == 64 * 16
    # A lone batch's fit is the whole pipeline's; the model divides it by pp.
    whole = load_profile(out).model(1, 1).prefill_time(64, 64 * 64, 1)
    assert at_pp2.prefill_time(64, 64 * 64, 1) == pytest.approx(whole / 2)


def test_grid_too_small_to_fit_is_refused():
    with pytest.raises(ConfigError, match="at least 3 distinct points"):
        profile_engine(grid=ProfileGrid(((1, 16),), GRID.decode), repeats=1, progress=False)


CPU_PLAN = [
    "plan", "--model", "tiny", "--gpu", "cpu", "--nodes", "1", "--gpus-per-node", "2",
    "--ttft-slo", "0.25", "--tpot-slo", "0.05", "--workload", "code-completion-like",
    "--requests", "40",
]  # fmt: skip


def test_planning_cpu_nodes_needs_a_profile(capsys):
    assert main(CPU_PLAN) == 2
    assert "disagg profile --device cpu" in capsys.readouterr().err


def test_cpu_plan_writes_a_cpu_deployment(tmp_path, capsys):
    from disagg.deployment import load_deployment
    from disagg.sim.latency import DecodePiece, LatencyProfile, TpProfile

    profile = LatencyProfile(
        unit="ms",
        kv_bytes_per_token=2048,
        tp={"1": TpProfile(
            prefill=[4.0, 0.08, 1e-4],
            decode=[DecodePiece(max_batch=None, coef=[3.0, 1e-3, 0.13])],
            kv_capacity_tokens=1 << 19,
        )},
    )  # fmt: skip
    save_profile(profile, tmp_path / "p.json")
    out = tmp_path / "d.yaml"
    argv = [*CPU_PLAN, "--latency-profile", str(tmp_path / "p.json"), "-o", str(out), "--json"]
    argv += ["--layout", "disaggregated"]
    assert main(argv) == 0, capsys.readouterr().err
    j = json.loads(capsys.readouterr().out)
    assert j["gpu"] == "cpu" and j["gpus_used"] == 2
    dep = load_deployment(out)
    assert dep.device == "cpu" and dep.model == "tiny"
    assert all(n.devices == [] for n in dep.nodes)
    assert (dep.prefill.instances, dep.decode.instances) == (1, 1)


def test_the_planner_modules_import_one_another_without_a_cycle():
    """Fitting, timing the engine and the command line are separate modules; counting
    imports inside functions too, no planner module reaches itself."""
    import ast
    from pathlib import Path

    import disagg.planner

    root = Path(disagg.planner.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n.split(".")[2] for n in names if n.startswith("disagg.planner.")}
        graph[path.stem] = deps - {path.stem}
    assert graph["fit"] <= set(), graph["fit"]  # fitting needs nothing else of the planner
    assert "profile" not in graph["timing"] | graph["served"]

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and reaches(dep, target, seen | {dep})):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, cycles

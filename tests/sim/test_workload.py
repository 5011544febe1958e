"""Workloads: arrival processes and length distributions have the stated statistics, are
deterministic per seed and per client, traces round-trip, and every bad input is a
ConfigError naming the field.

Statistical checks use a fixed seed, so they are deterministic; their tolerances are
4 standard deviations of the estimate (a fresh seed would fail one by chance with
probability about 6e-5), unless stated otherwise.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg.errors import ConfigError
from disagg.sim.workload import (
    Arrival,
    Workload,
    load_trace,
    load_workload,
    save_trace,
    workload_from_spec,
)

PRESETS = Path(__file__).resolve().parents[2] / "bench" / "workloads"


def client(id: str = "a", **kw) -> dict:
    return {"id": id, "arrival": "poisson", "rate": 1.0, "input_len": 8, "output_len": 8} | kw


def spec(*clients: dict, duration: float = 100.0, seed: int = 0) -> dict:
    return {"duration": duration, "seed": seed, "clients": list(clients) or [client()]}


def times(w: Workload, client_id: str = "a") -> np.ndarray:
    return np.array([a.time for a in w.arrivals if a.client_id == client_id])


def lengths(w: Workload, which: str = "prompt_len") -> np.ndarray:
    return np.array([getattr(a, which) for a in w.arrivals])


def within_sigmas(observed: float, expected: float, variance: float, k: float = 4.0) -> bool:
    return abs(observed - expected) <= k * math.sqrt(variance)


# -- arrival processes ------------------------------------------------------------------


def test_poisson_count_and_gaps():
    w = workload_from_spec(spec(client(rate=5.0), duration=2000))
    t = times(w)
    assert within_sigmas(len(t), 10_000, 10_000)  # Poisson: variance = mean
    gaps = np.diff(t)
    # Exponential gaps: mean 1/rate and coefficient of variation 1 (2% on 10k gaps).
    assert gaps.mean() == pytest.approx(0.2, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.04)


def test_uniform_is_evenly_spaced_from_start():
    w = workload_from_spec(spec(client(arrival="uniform", rate=4.0, start=10.0), duration=60))
    t = times(w)
    assert t[0] == 10.0
    assert np.allclose(np.diff(t), 0.25, rtol=0, atol=1e-9)
    assert len(t) == 200 and t[-1] < 60


def test_gamma_rate_and_cv():
    w = workload_from_spec(spec(client(arrival="gamma", rate=10.0, cv=2.0), duration=2000))
    t = times(w)
    # A renewal process's count has variance cv²·rate·T for long T.
    assert within_sigmas(len(t), 20_000, 4 * 20_000)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.05)  # ~2% observed


def test_gamma_with_cv_one_matches_poisson_statistics():
    w = workload_from_spec(spec(client(arrival="gamma", rate=5.0, cv=1.0), duration=2000))
    gaps = np.diff(times(w))
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.04)


def test_on_off_has_no_arrivals_in_off_periods():
    c = client(arrival="on_off", rate=6.0, period=20.0, start=7.0)
    w = workload_from_spec(spec(c, duration=1007))
    t = times(w)
    phase = np.mod(t - 7.0, 40.0)
    assert (phase < 20.0 + 1e-9).all()
    assert t.min() >= 7.0 and t.max() < 1007
    # 1000 s from start = 25 cycles: 500 s on.
    assert within_sigmas(len(t), 3000, 3000)
    # Every on window gets its share (120 expected), not just the first ones.
    counts = np.histogram(t, bins=np.arange(7.0, 1008.0, 40.0))[0]
    assert (counts > 60).all()


def test_on_off_partial_last_window():
    # 50 s window with period 20: on [0,20), off [20,40), on [40,50).
    w = workload_from_spec(spec(client(arrival="on_off", rate=50.0, period=20.0), duration=50))
    t = times(w)
    assert not ((t >= 20) & (t < 40)).any()
    assert ((t >= 40) & (t < 50)).sum() > 300  # expected 500


def test_ramp_halves_match_integrated_rate():
    c = client(arrival="ramp", rate=1.0, rate_end=9.0)
    t = times(workload_from_spec(spec(c, duration=1000)))
    # λ(t) = 1 + 8t/1000: ∫₀⁵⁰⁰ = 500 + 1000 = 1500; ∫₅₀₀¹⁰⁰⁰ = 5000 − 1500 = 3500.
    assert within_sigmas((t < 500).sum(), 1500, 1500)
    assert within_sigmas((t >= 500).sum(), 3500, 3500)


def test_ramp_down_to_zero_and_over_client_window():
    # Rate 4 at start=100 falling to 0 at end=300; nothing outside [100, 300).
    c = client(arrival="ramp", rate=4.0, rate_end=0.0, start=100.0, end=300.0)
    t = times(workload_from_spec(spec(c, duration=500)))
    assert t.min() >= 100 and t.max() < 300
    # ∫ over [100,200) = 4·100 − 100²·4/(2·200) = 300; over [200,300) = 100.
    assert within_sigmas((t < 200).sum(), 300, 300)
    assert within_sigmas((t >= 200).sum(), 100, 100)


def test_ramp_slope_uses_client_end_even_past_duration():
    # end=2000 > duration=1000: rate goes 1 → 3 over 2000 s, cut at 1000 (where it is 2).
    c = client(arrival="ramp", rate=1.0, rate_end=3.0, end=2000.0)
    t = times(workload_from_spec(spec(c, duration=1000)))
    assert t.max() < 1000
    assert within_sigmas(len(t), 1500, 1500)  # ∫₀¹⁰⁰⁰ (1 + t/1000) dt


@pytest.mark.parametrize("arrival", ["poisson", "uniform", "gamma", "on_off", "ramp"])
def test_start_and_end_are_respected(arrival):
    extra = {"gamma": {"cv": 1.5}, "on_off": {"period": 5.0}, "ramp": {"rate_end": 3.0}}
    c = client(arrival=arrival, rate=5.0, start=30.0, end=70.0, **extra.get(arrival, {}))
    t = times(workload_from_spec(spec(c, duration=100)))
    assert len(t) > 0 and t.min() >= 30.0 and t.max() < 70.0


def test_end_past_duration_is_cut_at_duration():
    c = client(arrival="uniform", rate=1.0, end=500.0)
    t = times(workload_from_spec(spec(c, duration=100)))
    assert t.max() < 100 and len(t) == 100


# -- lengths ----------------------------------------------------------------------------


def test_fixed_lengths():
    w = workload_from_spec(spec(client(input_len=512, output_len=32)))
    assert set(lengths(w)) == {512} and set(lengths(w, "output_len")) == {32}


def test_uniform_lengths_are_inclusive():
    c = client(rate=50.0, input_len={"dist": "uniform", "low": 10, "high": 20})
    p = lengths(workload_from_spec(spec(c)))
    assert p.min() == 10 and p.max() == 20
    assert set(p) == set(range(10, 21))
    assert within_sigmas(p.mean(), 15.0, (11**2 - 1) / 12 / len(p))


def test_lognormal_median_and_mean_forms_agree():
    by_median = client(rate=50.0, input_len={"dist": "lognormal", "median": 200, "sigma": 1.0})
    by_mean = client(
        rate=50.0, input_len={"dist": "lognormal", "mean": math.log(200), "sigma": 1.0}
    )
    p = lengths(workload_from_spec(spec(by_median)))
    assert (p == lengths(workload_from_spec(spec(by_mean)))).all()
    # Sample median of n draws: std ≈ 1.2533·σ_X/√n in log space → ~2% here.
    assert np.median(p) == pytest.approx(200, rel=0.05)
    assert np.median(np.log(p)) == pytest.approx(math.log(200), abs=0.05)
    assert np.log(p).std() == pytest.approx(1.0, rel=0.05)


def test_normal_lengths():
    c = client(rate=50.0, output_len={"dist": "normal", "mean": 300, "std": 40})
    o = lengths(workload_from_spec(spec(c)), "output_len")
    assert within_sigmas(o.mean(), 300, 40**2 / len(o))
    assert o.std() == pytest.approx(40, rel=0.05)


def test_lengths_are_clipped_to_at_least_one():
    c = client(rate=50.0, input_len={"dist": "normal", "mean": 0, "std": 5})
    p = lengths(workload_from_spec(spec(c)))
    assert p.min() == 1
    assert (p == 1).mean() > 0.5  # everything at or below 0.5 rounds or clips to 1


def test_min_and_max_clip():
    c = client(
        rate=50.0,
        input_len={"dist": "lognormal", "median": 100, "sigma": 2.0, "min": 20, "max": 400},
    )
    p = lengths(workload_from_spec(spec(c)))
    assert p.min() == 20 and p.max() == 400
    assert p.dtype.kind == "i"


def test_huge_lognormal_tail_does_not_overflow():
    c = client(rate=10.0, input_len={"dist": "lognormal", "mean": 800, "sigma": 1.0})
    p = lengths(workload_from_spec(spec(c)))
    assert (p == 2**31 - 1).all()


# -- determinism and order ------------------------------------------------------------


def test_same_seed_same_arrivals_different_seed_differs():
    s = spec(client("a"), client("b", arrival="gamma", cv=3.0))
    assert workload_from_spec(s).arrivals == workload_from_spec(copy.deepcopy(s)).arrivals
    other = spec(client("a"), client("b", arrival="gamma", cv=3.0), seed=1)
    assert workload_from_spec(s).arrivals != workload_from_spec(other).arrivals


def test_appending_a_client_leaves_the_others_unchanged():
    a = client("a", input_len={"dist": "uniform", "low": 1, "high": 100})
    b = client("b", arrival="ramp", rate=2.0, rate_end=0.5)
    before = workload_from_spec(spec(a, b)).arrivals
    after = workload_from_spec(spec(a, b, client("c", rate=7.0))).arrivals
    assert [x for x in after if x.client_id != "c"] == before


def test_changing_a_length_distribution_leaves_times_alone():
    a = workload_from_spec(spec(client(output_len=8)))
    b = workload_from_spec(spec(client(output_len={"dist": "normal", "mean": 50, "std": 9})))
    assert [x.time for x in a.arrivals] == [x.time for x in b.arrivals]


def test_sorted_with_ties_in_client_order():
    u = {"arrival": "uniform", "rate": 1.0}
    w = workload_from_spec(spec(client("z", **u), client("a", **u), duration=5))
    assert [(a.time, a.client_id) for a in w.arrivals[:4]] == [
        (0.0, "z"),
        (0.0, "a"),
        (1.0, "z"),
        (1.0, "a"),
    ]
    assert w.client_ids == ["z", "a"]


def test_workload_fields():
    w = workload_from_spec(spec(client("a", weight=2.5), client("b", rate=0.001), duration=10))
    assert w.duration == 10.0
    assert w.weights == {"a": 2.5, "b": 1.0}
    assert w.client_ids == ["a", "b"]  # "b" most likely sent nothing, but is listed
    assert all(isinstance(a, Arrival) for a in w.arrivals)


def test_generation_is_fast():
    s = spec(
        client("a", rate=60.0, input_len={"dist": "lognormal", "median": 200, "sigma": 1.0}),
        client("b", arrival="gamma", rate=40.0, cv=2.0),
        client("c", arrival="ramp", rate=10.0, rate_end=30.0),
        duration=1000,
    )
    start = time.perf_counter()
    w = workload_from_spec(s)
    elapsed = time.perf_counter() - start
    assert len(w.arrivals) > 100_000
    assert elapsed < 1.0, f"{len(w.arrivals)} arrivals took {elapsed:.2f} s"


# -- property: any valid spec gives sorted arrivals in bounds ----------------------------

_lengths = st.one_of(
    st.integers(1, 4096),
    st.builds(
        lambda lo, d: {"dist": "uniform", "low": lo, "high": lo + d},
        st.integers(1, 500),
        st.integers(0, 500),
    ),
    st.builds(
        lambda m, s, hi: {"dist": "lognormal", "median": m, "sigma": s, "max": hi},
        st.floats(1, 1000),
        st.floats(0, 3),
        st.integers(1, 5000),
    ),
    st.builds(
        lambda m, s, lo: {"dist": "normal", "mean": m, "std": s, "min": lo},
        st.floats(-100, 1000),
        st.floats(0, 300),
        st.integers(1, 50),
    ),
)


@st.composite
def _clients(draw, index: int, duration: float) -> dict:
    arrival = draw(st.sampled_from(["poisson", "uniform", "gamma", "on_off", "ramp"]))
    c = {
        "id": f"c{index}",
        "arrival": arrival,
        "rate": draw(st.floats(0.01, 20)),
        "input_len": draw(_lengths),
        "output_len": draw(_lengths),
        "weight": draw(st.floats(0.1, 10)),
    }
    start = draw(st.floats(0, duration * 0.9))
    c["start"] = start
    if draw(st.booleans()):
        c["end"] = draw(st.floats(start + 0.01, duration * 1.5))
    extra = {
        "gamma": ("cv", st.floats(0.1, 5)),
        "on_off": ("period", st.floats(0.1, 50)),
        "ramp": ("rate_end", st.floats(0, 20)),
    }
    if arrival in extra:
        name, strategy = extra[arrival]
        c[name] = draw(strategy)
    return c


@st.composite
def _specs(draw) -> dict:
    duration = draw(st.floats(1, 200))
    n = draw(st.integers(1, 4))
    clients = [draw(_clients(i, duration)) for i in range(n)]
    return {"duration": duration, "seed": draw(st.integers(0, 2**32)), "clients": clients}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs())
def test_any_valid_spec_gives_sorted_arrivals_in_bounds(s):
    w = workload_from_spec(s)
    order = {c["id"]: i for i, c in enumerate(s["clients"])}
    keys = [(a.time, order[a.client_id]) for a in w.arrivals]
    assert keys == sorted(keys)
    for c in s["clients"]:
        t = times(w, c["id"])
        if len(t):
            assert t.min() >= c["start"] and t.max() < min(c.get("end", w.duration), w.duration)
    assert all(a.prompt_len >= 1 and a.output_len >= 1 for a in w.arrivals)
    for a in w.arrivals:
        for key, value in (("input_len", a.prompt_len), ("output_len", a.output_len)):
            length = s["clients"][order[a.client_id]][key]
            if isinstance(length, dict):
                assert value >= length.get("min", 1)
                assert value <= length.get("max", length.get("high", value))
    assert workload_from_spec(s).arrivals == w.arrivals


# -- traces -----------------------------------------------------------------------------


def _write_trace(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _row(t: float, c: str = "a", p: int = 10, o: int = 20) -> dict:
    return {"time": t, "client_id": c, "prompt_len": p, "output_len": o}


def test_trace_round_trip(tmp_path):
    s = spec(
        client("a", input_len={"dist": "lognormal", "median": 200, "sigma": 1.0}),
        client("b", arrival="gamma", cv=2.0),
    )
    w = workload_from_spec(s)
    save_trace(w, tmp_path / "t.jsonl")
    back = load_trace(tmp_path / "t.jsonl", duration=w.duration)
    assert back.arrivals == w.arrivals  # floats survive JSON exactly
    assert back.duration == w.duration and back.client_ids == ["a", "b"]
    assert back.weights == {"a": 1.0, "b": 1.0}


def test_trace_duration_default_sorting_and_blank_lines(tmp_path):
    path = _write_trace(
        tmp_path / "t.jsonl", [_row(5.0, "b"), "", "   ", _row(2.5, "a"), _row(5.0, "a")]
    )
    w = load_workload(path)
    assert w.duration == 5.0
    assert w.client_ids == ["b", "a"]  # order of first appearance
    # Sorted by time; the tie at 5.0 goes in client order (b first).
    assert [(a.time, a.client_id) for a in w.arrivals] == [(2.5, "a"), (5.0, "b"), (5.0, "a")]


def test_trace_duration_given_drops_later_arrivals(tmp_path):
    path = _write_trace(tmp_path / "t.jsonl", [_row(1.0), _row(4.0), _row(9.0)])
    w = load_trace(path, duration=4.0)
    assert [a.time for a in w.arrivals] == [1.0, 4.0] and w.duration == 4.0
    assert len(load_trace(path, duration=100).arrivals) == 3


def test_spec_with_relative_trace_and_weights(tmp_path):
    (tmp_path / "traces").mkdir()
    _write_trace(tmp_path / "traces" / "t.jsonl", [_row(1.0, "a"), _row(2.0, "b")])
    spec_path = tmp_path / "w.json"
    spec_path.write_text(
        json.dumps({"duration": 10, "trace": "traces/t.jsonl", "weights": {"a": 2}})
    )
    w = load_workload(spec_path)
    assert w.duration == 10.0 and len(w.arrivals) == 2
    assert w.weights == {"a": 2.0, "b": 1.0}
    # From a dict, relative to base_dir; an absolute path needs none.
    absolute = {"trace": str(tmp_path / "traces" / "t.jsonl")}
    assert workload_from_spec(absolute).duration == 2.0
    relative = {"trace": "traces/t.jsonl"}
    assert workload_from_spec(relative, base_dir=tmp_path).arrivals == w.arrivals


# -- bad input --------------------------------------------------------------------------

BAD_SPECS = [
    ({"bogus": 1}, "bogus"),
    ({"duration": 0}, "duration"),
    ({"duration": -5}, "duration"),
    ({"duration": "600"}, "duration"),
    ({"duration": None}, "duration"),
    ({"seed": -1}, "seed"),
    ({"clients": []}, "clients"),
    ({"clients": None}, "clients"),
    ({"clients": [7]}, "clients[0]"),
    ({"weights": {"a": 2}}, "weights"),
    ({"clients": [client(colour="red")]}, "clients[0].colour"),
    ({"clients": [client(rate=0)]}, "clients[0].rate"),
    ({"clients": [client(rate=-1.5)]}, "clients[0].rate"),
    ({"clients": [client(rate=float("nan"))]}, "clients[0].rate"),
    ({"clients": [client(rate=1e12)]}, "clients[0].rate"),
    ({"clients": [client(arrival="bursty")]}, "clients[0].arrival"),
    ({"clients": [client(arrival="gamma")]}, "clients[0].cv"),
    ({"clients": [client(arrival="on_off")]}, "clients[0].period"),
    ({"clients": [client(arrival="ramp")]}, "clients[0].rate_end"),
    ({"clients": [client(cv=2.0)]}, "clients[0].cv"),
    ({"clients": [client(arrival="gamma", cv=0)]}, "clients[0].cv"),
    ({"clients": [client(arrival="gamma", cv=1e200)]}, "clients[0].cv"),
    ({"clients": [client(arrival="ramp", rate_end=-1)]}, "clients[0].rate_end"),
    ({"clients": [client(start=50.0, end=50.0)]}, "clients[0].end"),
    ({"clients": [client(start=60.0, end=10.0)]}, "clients[0].end"),
    ({"clients": [client(start=100.0)]}, "clients[0].start"),
    ({"clients": [client(start=-1.0)]}, "clients[0].start"),
    ({"clients": [client("a"), client("a")]}, "clients[1].id"),
    ({"clients": [client("")]}, "clients[0].id"),
    ({"clients": [client(weight=0)]}, "clients[0].weight"),
    ({"clients": [client(weight=-2)]}, "clients[0].weight"),
    (
        {"clients": [{"id": "a", "arrival": "poisson", "rate": 1, "output_len": 8}]},
        "clients[0].input_len",
    ),
    ({"clients": [client(input_len=0)]}, "clients[0].input_len"),
    ({"clients": [client(input_len=25.5)]}, "clients[0].input_len"),
    ({"clients": [client(input_len=True)]}, "clients[0].input_len"),
    ({"clients": [client(input_len={"low": 1, "high": 2})]}, "clients[0].input_len.dist"),
    ({"clients": [client(input_len={"dist": ["uniform"]})]}, "clients[0].input_len.dist"),
    ({"clients": [client(input_len=2**40)]}, "clients[0].input_len"),
    (
        {"clients": [client(input_len={"dist": "uniform", "low": 1, "high": 10**30})]},
        "clients[0].input_len.high",
    ),
    ({"clients": [client(output_len={"dist": "zipf"})]}, "clients[0].output_len.dist"),
    ({"clients": [client(input_len={"dist": "uniform", "low": 5})]}, "clients[0].input_len.high"),
    (
        {"clients": [client(input_len={"dist": "uniform", "low": 5, "high": 4})]},
        "clients[0].input_len.high",
    ),
    (
        {"clients": [client(input_len={"dist": "uniform", "low": 0, "high": 4})]},
        "clients[0].input_len.low",
    ),
    (
        {"clients": [client(input_len={"dist": "normal", "mean": 5, "std": -1})]},
        "clients[0].input_len.std",
    ),
    (
        {"clients": [client(input_len={"dist": "normal", "mean": 5, "sd": 1})]},
        "clients[0].input_len.sd",
    ),
    (
        {"clients": [client(input_len={"dist": "lognormal", "sigma": 1})]},
        "clients[0].input_len.median",
    ),
    (
        {"clients": [client(input_len={"dist": "lognormal", "sigma": 1, "mean": 2, "median": 7})]},
        "clients[0].input_len.median",
    ),
    (
        {
            "clients": [
                client(input_len={"dist": "normal", "mean": 5, "std": 1, "min": 9, "max": 3})
            ]
        },
        "clients[0].input_len.max",
    ),
    (
        {
            "clients": [
                client(),
                client("b", output_len={"dist": "normal", "mean": 1, "std": 1, "min": 0}),
            ]
        },
        "clients[1].output_len.min",
    ),
    ({"trace": "t.jsonl", "clients": [client()]}, "clients"),
    ({"trace": "t.jsonl", "clients": None, "seed": 3}, "seed"),
    ({"trace": "t.jsonl", "clients": None, "seed": None, "weights": {"a": 0}}, "weights.a"),
    ({"trace": ""}, "trace"),
]


@pytest.mark.parametrize(("change", "field"), BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_bad_spec_is_a_config_error_naming_the_field(change, field):
    # A None in `change` removes that key from the base spec.
    s = {k: v for k, v in (spec(client()) | change).items() if v is not None}
    with pytest.raises(ConfigError) as info:
        workload_from_spec(s)
    assert info.value.field == field, str(info.value)


def test_unknown_arrival_and_dist_list_the_allowed_values():
    with pytest.raises(ConfigError, match="poisson, uniform, gamma, on_off, ramp"):
        workload_from_spec(spec(client(arrival="bursty")))
    with pytest.raises(ConfigError, match="uniform, lognormal, normal"):
        workload_from_spec(spec(client(input_len={"dist": "zipf"})))
    with pytest.raises(ConfigError, match=r"allowed: .*rate_end"):
        workload_from_spec(spec(client(colour="red")))


def test_spec_must_be_an_object():
    with pytest.raises(ConfigError) as info:
        workload_from_spec([client()])  # type: ignore[arg-type]
    assert info.value.field == "spec"


def test_missing_file(tmp_path):
    for name in ("nope.json", "nope.jsonl"):
        with pytest.raises(ConfigError, match="no such file") as info:
            load_workload(tmp_path / name)
        assert info.value.field == str(tmp_path / name)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{\n  "duration": 10,\n  "clients": [,]\n}\n')
    with pytest.raises(ConfigError, match="invalid JSON") as info:
        load_workload(path)
    assert info.value.field == f"{path}:3"


def test_spec_file_error_names_the_file(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(spec(client(rate=-1))))
    with pytest.raises(ConfigError, match=str(path)) as info:
        load_workload(path)
    assert info.value.field == "clients[0].rate"


def test_spec_with_missing_trace(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"trace": "missing.jsonl"}))
    with pytest.raises(ConfigError) as info:
        load_workload(path)
    assert info.value.field == str(tmp_path / "missing.jsonl")


def test_weight_for_a_client_not_in_the_trace(tmp_path):
    _write_trace(tmp_path / "t.jsonl", [_row(1.0, "a")])
    with pytest.raises(ConfigError) as info:
        workload_from_spec({"trace": "t.jsonl", "weights": {"zed": 2}}, base_dir=tmp_path)
    assert info.value.field == "weights.zed"


BAD_TRACE_LINES = [
    ({"time": 1.0, "client_id": "a", "prompt_len": 10}, "output_len"),
    ({"time": 1.0, "client_id": "a", "prompt_len": -3, "output_len": 5}, "prompt_len"),
    ({"time": 1.0, "client_id": "a", "prompt_len": 3, "output_len": 0}, "output_len"),
    ({"time": 1.0, "client_id": "a", "prompt_len": 3.5, "output_len": 5}, "prompt_len"),
    ({"time": -1.0, "client_id": "a", "prompt_len": 3, "output_len": 5}, "time"),
    ({"time": "1", "client_id": "a", "prompt_len": 3, "output_len": 5}, "time"),
    ({"time": 1.0, "client_id": "", "prompt_len": 3, "output_len": 5}, "client_id"),
    ({"time": 1.0, "client_id": 4, "prompt_len": 3, "output_len": 5}, "client_id"),
    (_row(1.0) | {"model": "x"}, "model"),
]


@pytest.mark.parametrize(("bad", "key"), BAD_TRACE_LINES, ids=[k for _, k in BAD_TRACE_LINES])
def test_bad_trace_line_names_line_and_key(tmp_path, bad, key):
    path = _write_trace(tmp_path / "t.jsonl", [_row(0.5), "", bad])
    with pytest.raises(ConfigError) as info:
        load_trace(path)
    assert info.value.field == f"{path}:3.{key}"


@pytest.mark.parametrize("line", ["{not json", "[1, 2]", "NaN"])
def test_trace_line_that_is_not_an_object(tmp_path, line):
    path = _write_trace(tmp_path / "t.jsonl", [_row(0.5), line])
    with pytest.raises(ConfigError) as info:
        load_trace(path)
    assert info.value.field == f"{path}:2"


def test_trace_without_a_duration(tmp_path):
    path = _write_trace(tmp_path / "t.jsonl", [_row(0.0)])
    with pytest.raises(ConfigError) as info:
        load_trace(path)
    assert info.value.field == "duration"
    assert load_trace(path, duration=3).duration == 3.0
    with pytest.raises(ConfigError):
        load_trace(path, duration=-1)


# -- presets ----------------------------------------------------------------------------


def test_every_preset_loads():
    names = sorted(p.stem for p in PRESETS.glob("*.json"))
    expected = {
        "overload",
        "overload_multi",
        "overload_weighted",
        "proportional",
        "increase",
        "on_off_less",
        "on_off_overload",
        "poisson_short_long",
        "poisson_short_long_2",
        "dist_shift",
        "sharegpt_like",
    }
    assert expected <= set(names)
    for name in names:
        w = load_workload(PRESETS / f"{name}.json")
        assert w.arrivals and set(w.client_ids) == {a.client_id for a in w.arrivals}, name


def test_preset_parameters():
    w = load_workload(PRESETS / "poisson_short_long_2.json")
    a = [x for x in w.arrivals if x.client_id == "a"]
    b = [x for x in w.arrivals if x.client_id == "b"]
    assert {(x.prompt_len, x.output_len) for x in a} == {(512, 32)}
    assert {(x.prompt_len, x.output_len) for x in b} == {(32, 512)}
    assert within_sigmas(len(a), 8 * 600, 8 * 600) and within_sigmas(len(b), 900, 900)
    weighted = load_workload(PRESETS / "overload_weighted.json")
    assert list(weighted.weights.values()) == [1, 2, 3, 4]
    overload = load_workload(PRESETS / "overload.json")
    counts = {c: sum(x.client_id == c for x in overload.arrivals) for c in overload.client_ids}
    assert counts == {"a": 1.5 * 360, "b": 3 * 360}

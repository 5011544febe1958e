"""Calibration from service: the recorder reads what the coordinator hears, the refit
recovers known step times and messaging latencies from a served log, and the planner's
simulator charges what the profile measured."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from disagg.cli import main
from disagg.errors import ConfigError
from disagg.planner.goodput import Evaluator, LatencySource, SLOTarget
from disagg.planner.presets import CPU_NODE, load_plan_workload, resolve_model
from disagg.planner.served import ServedRecorder, calibrate
from disagg.planner.space import Deployment, PhaseConfig
from disagg.protocol.cluster import Ending, Prefilled, PrefillResult, StepTokens
from disagg.sim.latency import DecodePiece, LatencyProfile, TpProfile, load_profile, save_profile

PREFILL = (4.0, 0.05, 2e-5)  # ms
DECODE = (3.0, 2e-3, 0.4)  # ms
DISPATCH, RETURN, HANDOFF, GAP = 0.002, 0.001, 0.009, 0.0013  # s
KV_BYTES = 2048
BANDWIDTH = 1e9


def _base() -> LatencyProfile:
    return LatencyProfile(
        unit="ms",
        kv_bytes_per_token=KV_BYTES,
        tp={"1": TpProfile(
            prefill=[1.0, 0.01, 0.0],
            decode=[DecodePiece(max_batch=None, coef=[1.0, 1e-3, 0.1])],
            kv_capacity_tokens=1 << 16,
            fit_error={"prefill_median": 0.05},
        )},
    )  # fmt: skip


def _served_log(jitter: tuple[float, ...] = (1.0,)) -> dict:
    """Prefill batches spaced so that every second request finds the node idle (the
    others queued during the batch before and start GAP after it); each batch's time is
    the model's times the next factor of ``jitter``, in turn; decode steps back to back
    with exact periods, and an idle gap after a batch that finished."""
    prefill, requests = [], []
    t = 0.0
    for i, (b, n) in enumerate((b, n) for b in (1, 2, 3) for n in (16, 64, 200, 400)):
        seconds = (PREFILL[0] + PREFILL[1] * b * n + PREFILL[2] * b * n * n) / 1e3
        seconds *= jitter[i % len(jitter)]
        if i % 2:  # this one arrived while the previous batch ran: it queued
            arrived, t = prefill[-1][0], requests[-1][2] + GAP
        else:
            arrived, t = t, t + DISPATCH
        prefill.append([t, seconds, b * n, b * n * n, b])
        end = t + seconds
        requests.append(
            [arrived, t, end, end + RETURN, n, end + HANDOFF + n * KV_BYTES / BANDWIDTH]
        )
        t = end + 1.0
    decode = []
    now = 100.0
    for b in (1, 2, 4, 8, 16):
        for ctx in (40, 200, 600):
            for _ in range(4):
                now += (DECODE[0] + DECODE[1] * b * ctx + DECODE[2] * b) / 1e3
                decode.append(["d0", now, 0.001, b, b * ctx, True])
            decode[-1][5] = False  # the batch finished: the next step comes after idleness
            now += 5.0
    return {"prefill": prefill, "decode": decode, "requests": requests}


def test_calibration_recovers_step_times_and_messaging():
    c = calibrate(_base(), _served_log(), BANDWIDTH)
    entry = c.profile.tp["1"]
    assert entry.prefill == pytest.approx(PREFILL, rel=1e-6)
    assert [p.max_batch for p in entry.decode] == [None]
    # Σctx is rebuilt from the bin's mean context, so within rounding of one token.
    assert entry.decode[0].coef == pytest.approx(DECODE, rel=1e-3)
    assert c.profile.handoff_s == pytest.approx(HANDOFF)
    assert c.profile.ttft_overhead_s == pytest.approx(DISPATCH + RETURN)
    assert c.dispatch_s == pytest.approx(DISPATCH)  # the queued half is left out
    assert c.profile.prefill_gap_s == pytest.approx(GAP)  # measured on the queued half
    assert c.prefill_gaps == 6 and c.profile.prefill_jitter == pytest.approx(0.0, abs=1e-6)
    # Only steps after a step that left sequences running have a period.
    assert c.decode_steps == 15 * 3
    assert entry.kv_capacity_tokens == 1 << 16  # capacity is the isolated profile's
    assert entry.fit_error["prefill_median"] == 0.05  # the isolated fit's error is kept
    assert entry.fit_error["served_decode_max"] < 1e-3
    assert "served" in c.profile.sources
    assert "handoff_s 9.0 ms" in c.summary()
    assert "prefill_gap_s 1.30 ms" in c.summary()


def test_calibration_measures_the_spread_of_served_prefill_batches():
    spread = 0.1
    c = calibrate(_base(), _served_log(jitter=(math.exp(spread), math.exp(-spread))), BANDWIDTH)
    # Twelve batches: the refit leans a little towards the pattern, and takes up some of it.
    assert 0.85 * spread < c.profile.prefill_jitter <= spread
    assert c.profile.prefill_gap_s == pytest.approx(GAP)  # the gaps are timed, not scaled


def test_too_little_service_is_refused_with_the_reason():
    log = _served_log()
    log["decode"] = log["decode"][:6]
    with pytest.raises(ConfigError, match="usable bins"):
        calibrate(_base(), log, BANDWIDTH)
    log = _served_log()
    for row in log["requests"]:
        row[5] = None
    with pytest.raises(ConfigError, match="hand-off"):
        calibrate(_base(), log, BANDWIDTH)


def test_profiles_without_served_fields_still_load(tmp_path):
    path = tmp_path / "p.json"
    save_profile(_base(), path)
    data = json.loads(path.read_text())
    del data["handoff_s"], data["ttft_overhead_s"]  # a file written before these fields
    path.write_text(json.dumps(data))
    old = load_profile(path)
    assert old.handoff_s is None and old.ttft_overhead_s is None
    calibrated = calibrate(old, _served_log(), BANDWIDTH).profile
    save_profile(calibrated, path)
    assert load_profile(path) == calibrated


def test_cli_refits_a_profile_from_a_served_log(tmp_path, capsys):
    base, log, out = tmp_path / "p.json", tmp_path / "served.json", tmp_path / "out.json"
    save_profile(_base(), base)
    log.write_text(json.dumps(_served_log()))
    argv = ["profile", "--from-served", str(log), "--base", str(base), "-o", str(out)]
    assert main([*argv, "--transfer-bandwidth", str(BANDWIDTH)]) == 0
    assert "handoff_s 9.0 ms" in capsys.readouterr().out
    assert load_profile(out).handoff_s == pytest.approx(HANDOFF)
    assert main(argv[:3] + argv[5:]) == 2  # no --base
    assert "--base" in capsys.readouterr().err


def test_recorder_sees_batches_steps_and_requests_as_the_coordinators_observer():
    observers = []
    tracked = {
        7: SimpleNamespace(num_prompt_tokens=10, arrival_time=1.0),
        8: SimpleNamespace(num_prompt_tokens=30, arrival_time=1.5),
    }
    transfer = SimpleNamespace(first=lambda name: 2.5 if name == "transfer_end" else None)
    coordinator = SimpleNamespace(
        requests=tracked,
        events=SimpleNamespace(get=lambda rid: transfer if rid == "7" else None),
        add_node_observer=observers.append,
    )
    recorder = ServedRecorder().attach(coordinator)
    node = SimpleNamespace(node_id="p0")
    results = [
        PrefillResult(rid=rid, first_token=5, prefill_start=2.0, prefill_s=0.25) for rid in (7, 8)
    ]
    (observe,) = observers
    observe(node, Prefilled(results=results), 2.3)
    step = StepTokens(
        rids=[7, 8], indices=[3, 1], tokens=[1, 1], texts=["", ""],
        finished=[Ending(rid=8, finish_reason="length")], step_s=0.01,
    )  # fmt: skip
    observe(node, step, 2.6)
    log = recorder.log()
    assert log["prefill"] == [[2.0, 0.25, 40, 10 * 10 + 30 * 30, 2]]
    assert log["decode"][0] == ["p0", 2.6, 0.01, 2, (10 + 3) + (30 + 1), True]
    (r7, r8) = log["requests"]
    assert r7 == [1.0, 2.0, 2.25, 2.3, 10, 2.5]
    assert r8[5] is None  # no transfer recorded


def _evaluator(profile: LatencyProfile) -> tuple[Evaluator, Deployment]:
    w = load_plan_workload("code-completion-like", 40, 0)
    src = LatencySource(resolve_model("tiny"), CPU_NODE, profile)
    ev = Evaluator(w, src, SLOTarget(0.25, 0.05, 0.9), "fcfs", 1e9, 1e9)
    return ev, Deployment(PhaseConfig(1, 1), 1, PhaseConfig(1, 1), 1, "high")


def test_simulator_charges_the_measured_overhead_and_hand_off():
    base = _base().model_copy(update={"tp": {"1": _base().tp["1"].model_copy(
        update={"prefill": list(PREFILL), "decode": [DecodePiece(max_batch=None, coef=list(DECODE))]}
    )}})  # fmt: skip
    plain_ev, d = _evaluator(base)
    plain = plain_ev.run(d, 2.0)
    slow_ev, _ = _evaluator(base.model_copy(update={"ttft_overhead_s": 0.1}))
    slow = slow_ev.run(d, 2.0)
    assert slow.ttft_p90 == pytest.approx(plain.ttft_p90 + 0.1)
    assert slow.tpot_p90 == pytest.approx(plain.tpot_p90)
    late_ev, _ = _evaluator(base.model_copy(update={"handoff_s": 0.2}))
    late = late_ev.run(d, 2.0)
    assert late.ttft_p90 == pytest.approx(plain.ttft_p90)
    assert late.tpot_p90 > plain.tpot_p90 + 0.2 / 200  # spread over at most ~200 tokens


def test_simulator_charges_the_prefill_nodes_turnaround_and_spread():
    base = _base().model_copy(update={"tp": {"1": _base().tp["1"].model_copy(
        update={"prefill": list(PREFILL), "decode": [DecodePiece(max_batch=None, coef=list(DECODE))]}
    )}})  # fmt: skip
    plain_ev, d = _evaluator(base)
    rate = 40.0  # prefill batches often find the next request waiting
    plain = plain_ev.run(d, rate)
    gap_ev, _ = _evaluator(base.model_copy(update={"prefill_gap_s": 0.01}))
    assert gap_ev.run(d, rate).ttft_p90 > plain.ttft_p90 + 0.005
    assert gap_ev.run(d, rate, "tpot") == plain_ev.run(d, rate, "tpot")  # decode alone
    spread_ev, _ = _evaluator(base.model_copy(update={"prefill_jitter": 0.3}))
    assert spread_ev.run(d, rate).ttft_p90 > plain.ttft_p90  # a long tail of batch times

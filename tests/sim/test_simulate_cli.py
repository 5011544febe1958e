"""``disagg simulate``: its JSON, its table, its plots, and the errors it gives for bad
input (exit code 2, the field and what is allowed, no traceback)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from disagg.cli import main
from disagg.sim.cli import POLICY_CHOICES

ROOT = Path(__file__).resolve().parents[2]
PROFILE = str(ROOT / "bench" / "profiles" / "distserve_opt13b_a100.json")

SPEC = {
    "duration": 30,
    "seed": 0,
    "clients": [
        {"id": "a", "arrival": "uniform", "rate": 4, "input_len": 256, "output_len": 128},
        {
            "id": "b",
            "arrival": "poisson",
            "rate": 2,
            "input_len": {"dist": "uniform", "low": 16, "high": 512},
            "output_len": 64,
            "weight": 2,
        },
    ],
}


@pytest.fixture
def spec_file(tmp_path):
    def write(spec: dict = SPEC, name: str = "w.json") -> str:
        path = tmp_path / name
        path.write_text(json.dumps(spec))
        return str(path)

    return write


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["simulate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_prints_one_object_with_the_figures(capsys, spec_file):
    code, out, err = run(
        capsys,
        "--workload", spec_file(),
        "--policy", "vtc",
        "--latency-profile", PROFILE,
        "--kv-capacity", "6000",
        "--ttft-slo", "2.0",
        "--tpot-slo", "0.1",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    s = json.loads(out)  # the whole of stdout is one object
    assert s["policy"] == "vtc" and s["cluster"] == "colocated"
    assert set(s["clients"]) == {"a", "b"}
    for c in s["clients"].values():
        for key in ("service", "requests", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
            assert isinstance(c[key], (int, float)), key
        assert c["service"] > 0 and c["requests"] > 0
        assert 0 < c["ttft_p50"] <= c["ttft_p90"]
        assert 0 < c["tpot_p50"] <= c["tpot_p90"]
    assert s["clients"]["b"]["weight"] == 2
    assert s["max_service_diff"] >= s["avg_service_diff"] >= 0
    assert s["throughput_tokens_per_s"] > 0
    assert 0 <= s["slo_attainment"] <= 1
    assert s["slo"] == {"ttft": 2.0, "tpot": 0.1}
    assert s["finished"] + s["unfinished"] + s["rejected"] == 30 * 4 + s["clients"]["b"]["arrived"]


def test_json_of_a_disaggregated_two_stage_run(capsys, spec_file):
    code, out, err = run(
        capsys,
        "--workload", spec_file(),
        "--policy", "two-stage-vtc",
        "--cluster", "disagg",
        "--prefill", "1",
        "--decode", "2",
        "--decode-tp", "2",
        "--latency-profile", PROFILE,
        "--publish-interval", "0.5",
        "--gpus", "5",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    s = json.loads(out)
    assert (s["policy"], s["cluster"]) == ("two-stage-vtc", "disagg")
    assert s["slo_attainment"] is None  # no SLO given
    assert s["finished"] > 0


def test_the_table_names_every_client_and_the_totals(capsys, spec_file):
    code, out, err = run(
        capsys, "--workload", spec_file(), "--policy", "fcfs", "--model", "opt-13b"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("fcfs on a colocated cluster, 30 s:")
    assert "TTFT p50" in lines[1]
    assert lines[2].split()[0] == "a" and lines[3].split()[0] == "b"
    assert any(line.startswith("throughput") for line in lines)
    assert "service difference" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_three_real_pngs(capsys, spec_file, tmp_path):
    out_dir = tmp_path / "plots"
    code, out, err = run(
        capsys, "--workload", spec_file(), "--policy", "vtc", "--plot", str(out_dir), "--json"
    )
    assert code == 0, err
    names = {"cumulative_service.png", "service_rate.png", "ttft_cdf.png"}
    assert {p.name for p in out_dir.iterdir()} == names
    assert sorted(Path(p).name for p in json.loads(out)["plots"]) == sorted(names)
    for name in names:
        path = out_dir / name
        assert path.stat().st_size > 10_000  # lines, axes and labels, not an empty canvas
        assert png_size(path) == (960, 540)  # 8 x 4.5 in at 120 dpi


# -- bad input -----------------------------------------------------------------------


def bad_spec(**client_changes) -> dict:
    client = {**SPEC["clients"][0], **client_changes}
    return {**SPEC, "clients": [client]}


BAD_SPECS = {
    "unknown field": (bad_spec(colour="red"), ["clients[0].colour", "unknown field", "arrival"]),
    "negative rate": (bad_spec(rate=-1), ["clients[0].rate", "greater than 0", "-1"]),
    "unknown distribution": (
        bad_spec(input_len={"dist": "zipf", "low": 1, "high": 2}),
        ["clients[0].input_len.dist", "uniform, lognormal, normal", "zipf"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS), ids=list(BAD_SPECS))
def test_a_bad_workload_exits_2_naming_the_field(capsys, spec_file, case):
    spec, expected = BAD_SPECS[case]
    code, out, err = run(capsys, "--workload", spec_file(spec), "--policy", "vtc")
    assert code == 2 and out == ""
    assert err.startswith("disagg simulate: error: ")
    for text in expected:
        assert text in err
    assert "Traceback" not in err


BAD_FLAGS = {
    "per-stage-vtc colocated": (["--policy", "per-stage-vtc"], ["policy", "fcfs, lcf, rpm, vtc"]),
    "vtc disaggregated": (
        ["--policy", "vtc", "--cluster", "disagg"],
        ["policy", "per-stage-vtc or two-stage-vtc"],
    ),
    "unknown gpu": (["--policy", "vtc", "--gpu", "v100"], ["gpu", "v100", "a100-80g, h100-80g"]),
    "unknown model": (["--policy", "vtc", "--model", "gpt-5"], ["model", "gpt-5", "llama-2-7b"]),
    "tp not dividing heads": (
        ["--policy", "vtc", "--model", "opt-13b", "--tp", "3"],
        ["tp", "40 heads", "valid tp: 1, 2, 4, 5, 8"],
    ),
    "decode tp not dividing heads": (
        ["--policy", "fcfs", "--cluster", "disagg", "--model", "opt-13b", "--decode-tp", "3"],
        ["decode_tp", "valid tp: 1, 2, 4, 5, 8"],
    ),
    "zero decode tp": (
        ["--policy", "fcfs", "--cluster", "disagg", "--model", "opt-13b", "--decode-tp", "0"],
        ["decode_tp", "0 ways"],
    ),
    "tp not profiled": (
        ["--policy", "vtc", "--latency-profile", PROFILE, "--tp", "8"],
        ["tp", "tp=8", "profiled degrees: 1, 2, 4"],
    ),
    "missing profile": (
        ["--policy", "vtc", "--latency-profile", "/nonexistent/profile.json"],
        ["/nonexistent/profile.json", "no such"],
    ),
    "ttft slo alone": (["--policy", "vtc", "--ttft-slo", "1"], ["ttft_slo", "--tpot-slo"]),
    "negative slo": (
        ["--policy", "vtc", "--ttft-slo", "-1", "--tpot-slo", "0.1"],
        ["ttft_slo", "must be > 0"],
    ),
    "zero instances": (["--policy", "vtc", "--instances", "0"], ["instances", ">= 1"]),
    "zero decode instances": (
        ["--policy", "fcfs", "--cluster", "disagg", "--decode", "0"],
        ["decode", ">= 1"],
    ),
    "zero kv capacity": (["--policy", "vtc", "--kv-capacity", "0"], ["kv_capacity", ">= 1"]),
    "negative bandwidth": (
        ["--policy", "vtc", "--transfer-bandwidth", "-5"],
        ["transfer_bandwidth", "> 0 GB/s", "-5"],
    ),
    "chunked prefill on disagg": (
        ["--policy", "fcfs", "--cluster", "disagg", "--chunked-prefill", "256"],
        ["chunked_prefill", "colocated"],
    ),
    "more instances than gpus": (
        ["--policy", "vtc", "--instances", "3", "--tp", "2", "--gpus", "4"],
        ["gpus", "needs 6 GPUs", "3 instances x tp 2 x pp 1", "--gpus >= 6"],
    ),
    "disaggregated pools past the gpus": (
        [
            "--policy",
            "fcfs",
            "--cluster",
            "disagg",
            "--prefill",
            "2",
            "--decode",
            "3",
            "--decode-tp",
            "2",
            "--gpus",
            "7",
        ],
        ["gpus", "needs 8 GPUs", "2 prefill x tp 1 x pp 1 + 3 decode x tp 2 x pp 1"],
    ),
    "zero gpus": (["--policy", "vtc", "--gpus", "0"], ["gpus", ">= 1"]),
    "rpm limit": (["--policy", "rpm", "--rpm-limit", "0"], ["rpm_limit", ">= 1"]),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS), ids=list(BAD_FLAGS))
def test_bad_flags_exit_2_naming_the_field_and_what_is_allowed(capsys, spec_file, case):
    flags, expected = BAD_FLAGS[case]
    code, out, err = run(capsys, "--workload", spec_file(), *flags)
    assert code == 2 and out == ""
    assert err.startswith("disagg simulate: error: ")
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in err


def test_enough_gpus_are_accepted(capsys, spec_file):
    flags = ["--workload", spec_file(), "--policy", "vtc", "--instances", "3", "--tp", "2"]
    assert run(capsys, *flags, "--gpus", "6")[0] == 0
    assert run(capsys, *flags, "--gpus", "5")[0] == 2


def test_a_missing_workload_file_is_an_error_not_a_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "--workload", str(tmp_path / "none.json"), "--policy", "vtc")
    assert code == 2 and out == ""
    assert "no such file" in err and "Traceback" not in err


def test_an_unknown_policy_is_refused_by_argparse_listing_the_choices(capsys, spec_file):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--workload", spec_file(), "--policy", "drr"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--policy" in err and "invalid choice: 'drr'" in err
    for policy in POLICY_CHOICES:
        assert policy in err
    assert "Traceback" not in err

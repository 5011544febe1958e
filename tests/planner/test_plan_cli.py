"""``disagg plan`` end to end: its JSON, its table, the deployment file, and the exit
code 2 with an explanation (never a traceback) for every impossible or bad request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disagg.cli import main
from disagg.deployment import load_deployment

ROOT = Path(__file__).resolve().parents[2]
PROFILE = str(ROOT / "bench" / "profiles" / "distserve_opt13b_a100.json")
BASE = [
    "--model", "opt-13b", "--gpu", "a100-80g", "--nodes", "1", "--gpus-per-node", "4",
    "--ttft-slo", "0.25", "--tpot-slo", "0.1", "--workload", "chatbot-like",
    "--requests", "60", "--latency-profile", PROFILE,
]  # fmt: skip


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_and_deployment_file_agree(capsys, tmp_path):
    path = tmp_path / "deployment.yaml"
    code, out, err = run(capsys, *BASE, "--json", "-o", str(path), "--layout", "disaggregated")
    assert code == 0, err
    j = json.loads(out)
    for key in ("prefill", "decode"):
        assert set(j[key]) == {"tp", "pp", "instances"}
    used = sum(j[k]["tp"] * j[k]["pp"] * j[k]["instances"] for k in ("prefill", "decode"))
    assert used == j["gpus_used"] <= 4
    assert j["per_gpu_goodput"] > 0
    assert j["colocated_per_gpu_goodput"] > 0
    assert j["ratio_to_colocated"] == pytest.approx(
        j["per_gpu_goodput"] / j["colocated_per_gpu_goodput"]
    )
    assert 0 < j["search_seconds"] < 60
    assert j["predicted"]["attainment"] >= 0.9
    dep = load_deployment(path)
    assert dep.prefill.model_dump() == j["prefill"]
    assert dep.decode.model_dump() == j["decode"]
    assert dep.slo is not None and (dep.slo.ttft_s, dep.slo.tpot_s) == (0.25, 0.1)
    assert dep.policy == "two-stage-vtc" and dep.model == "opt-13b"
    assert dep.predicted["per_gpu_goodput"] == j["per_gpu_goodput"]
    devices = [d for n in dep.nodes for d in n.devices]
    assert len(devices) == len(set(devices)) == used


def test_the_file_is_colocated_when_colocation_wins(capsys, tmp_path):
    """This setting's colocated goodput per GPU beats the disaggregated one (ratio < 1):
    -o writes the colocated layout the plan scored, with its predictions; --layout
    disaggregated writes the other, and both are read back as the kind they are."""
    path = tmp_path / "auto.yaml"
    code, out, err = run(capsys, *BASE, "--json", "-o", str(path))
    assert code == 0, err
    j = json.loads(out)
    assert j["ratio_to_colocated"] < 1
    dep = load_deployment(path)
    assert dep.kind == "colocated" and dep.prefill is None and dep.decode is None
    c = j["colocated"]
    assert dep.colocated is not None
    assert dep.colocated.model_dump() == {k: c[k] for k in ("tp", "pp", "instances")}
    assert [n.role for n in dep.nodes] == ["colocated"] * c["instances"]
    assert sorted(n.index for n in dep.nodes) == list(range(c["instances"]))
    assert dep.predicted["layout"] == "colocated"
    assert dep.predicted["per_gpu_goodput"] == c["per_gpu_goodput"]
    assert dep.predicted["disaggregated_per_gpu_goodput"] == j["per_gpu_goodput"]
    devices = [d for n in dep.nodes for d in n.devices]
    assert len(devices) == len(set(devices)) == c["gpus"]
    code, out, _ = run(capsys, *BASE, "-o", str(tmp_path / "d.yaml"), "--layout", "colocated")
    assert code == 0 and "colocated deployment written" in out
    assert load_deployment(tmp_path / "d.yaml").kind == "colocated"


def test_a_rate_gets_the_fewest_gpus_that_serve_it_and_the_file_has_those(capsys, tmp_path):
    code, out, err = run(capsys, *BASE, "--json")
    assert code == 0, err
    full = json.loads(out)
    rate = round(full["goodput"] * 0.3, 2)  # about a third of what the 4 GPUs serve
    path = tmp_path / "deployment.yaml"
    argv = [*BASE, "--json", "--rate", str(rate), "-o", str(path), "--layout", "disaggregated"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    f = json.loads(out)["for_rate"]
    assert f["rate"] == rate and f["attainment"] >= 0.9
    assert f["gpus_used"] < full["gpus_used"]
    # No fewer GPUs than the best goodput per GPU allows (with the grid's slack).
    assert f["gpus_used"] >= 0.9 * rate / full["per_gpu_goodput"]
    dep = load_deployment(path)
    assert dep.prefill.model_dump() == f["prefill"] and dep.decode.model_dump() == f["decode"]
    assert len(dep.nodes) == f["prefill"]["instances"] + f["decode"]["instances"]
    assert dep.predicted["rate"] == rate and dep.predicted["attainment"] == f["attainment"]
    code, out, _ = run(capsys, *BASE, "--rate", str(rate))
    assert f"fewest GPUs for {rate:g} req/s" in out


def test_table_names_the_layout_and_the_baseline(capsys):
    code, out, _ = run(capsys, *BASE, "--rate", "1")
    assert code == 0
    assert "prefill" in out and "decode" in out and "colocated" in out
    assert "goodput/GPU" in out and "P90 TTFT" in out
    assert "at 1 req/s:" in out


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (["--model", "opt-175b", "--gpu", "l4", "--latency-profile", ""], "does not fit"),
        (["--ttft-slo", "0.001"], "no layout meets"),
        (["--tpot-slo", "0.0001"], "TPOT SLO"),
        (["--rate", "500"], "needs more GPUs than the cluster has"),
        (["--model", "gpt-9"], "known presets: opt-13b"),
        (["--gpu", "v100"], "known: a100-80g"),
        (["--workload", "chat"], "known presets: chatbot-like"),
        (["--nodes", "0"], "nodes: must be >= 1"),
        (["--ttft-slo", "-1"], "ttft_slo: must be > 0"),
        (["--attainment", "1.5"], "attainment"),
    ],
)
def test_impossible_and_bad_requests_explain_and_exit_2(capsys, change, words):
    args = list(BASE)
    for flag, value in zip(change[::2], change[1::2], strict=True):
        i = args.index(flag) if flag in args else None
        if value == "" and i is not None:
            del args[i : i + 2]
        elif i is not None:
            args[i + 1] = value
        else:
            args += [flag, value]
    code, out, err = run(capsys, *args)
    assert code == 2
    assert words in err
    assert "Traceback" not in err and out == ""

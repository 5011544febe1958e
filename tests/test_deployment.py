"""The deployment file: round trips through YAML and JSON, and every bad field is a
ConfigError that names it (dotted path), never a pydantic traceback."""

from __future__ import annotations

import copy
import json

import pytest

from disagg.deployment import (
    Deployment,
    MixedDeploymentError,
    NodeRole,
    PhaseLayout,
    load_deployment,
    parse_deployment,
    save_deployment,
)
from disagg.errors import ConfigError

GOOD = {
    "model": "opt-13b",
    "device": "cuda",
    "policy": "two-stage-vtc",
    "slo": {"ttft_s": 0.25, "tpot_s": 0.1, "attainment": 0.9},
    "prefill": {"tp": 2, "pp": 1, "instances": 1},
    "decode": {"tp": 1, "pp": 1, "instances": 2},
    "nodes": [
        {"role": "prefill", "index": 0, "host": "localhost", "devices": [0, 1]},
        {"role": "decode", "index": 0, "devices": [2]},
        {"role": "decode", "index": 1, "devices": [3]},
    ],
    "predicted": {"per_gpu_goodput": 1.5, "ttft_p90_s": 0.2},
}


def test_round_trip_yaml(tmp_path):
    dep = parse_deployment(GOOD)
    path = tmp_path / "d.yaml"
    save_deployment(dep, path)
    assert load_deployment(path) == dep
    assert "prefill:" in path.read_text()  # YAML, not JSON


def test_json_is_read_too(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(GOOD))
    dep = load_deployment(path)
    assert dep.prefill == PhaseLayout(tp=2, pp=1, instances=1)
    assert dep.nodes[1] == NodeRole(role="decode", index=0, devices=[2])
    assert dep.coordinator.client_port == 5555


def test_minimal_cpu_deployment_takes_defaults():
    dep = Deployment(
        prefill=PhaseLayout(),
        decode=PhaseLayout(),
        nodes=[NodeRole(role="prefill", index=0), NodeRole(role="decode", index=0)],
    )
    assert (dep.model, dep.device, dep.policy, dep.slo) == ("tiny", "cpu", "two-stage-vtc", None)


def _with(path: str, value):
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        ("slo.ttft_s", 0, "slo.ttft_s", "greater than 0"),
        ("slo.tpot_s", -0.1, "slo.tpot_s", "greater than 0"),
        ("slo.attainment", 1.5, "slo.attainment", "less than or equal"),
        ("policy", "round-robin", "policy", "known: fcfs"),
        ("device", "tpu", "device", "cpu"),
        ("prefill.tp", 0, "prefill.tp", "greater than or equal to 1"),
        ("decode.instances", 3, "nodes", "2 decode node(s) listed but decode.instances is 3"),
        ("nodes.0.devices", [0], "nodes[0].devices", "tp x pp = 2 x 1 = 2 devices"),
        ("nodes.2.devices", [2], "nodes[2].devices", "already given to nodes[1]"),
        ("nodes.1.role", "router", "nodes[1].role", "prefill"),
        ("nodes.2.index", 5, "nodes", "indices must be 0..1"),
        ("nodes.1.devices", [], "nodes[1].devices", "list the GPU indices"),
        ("coordinator", {"client_port": 70000}, "coordinator.client_port", "65535"),
        ("coordinator", {"node_port": 5555}, "coordinator.node_port", "differ"),
        ("colour", "red", "colour", "unknown field"),
        ("prefill", _DELETE, "prefill", "required"),
        ("slo", {"ttft_s": 1, "tpot_s": 1, "p": 9}, "slo.p", "allowed: ttft_s, tpot_s"),
        ("nodes.1.colour", "red", "nodes[1].colour", "allowed: role, index, host, devices"),
    ],
)
def test_every_bad_field_is_named(path, value, field, words):
    with pytest.raises(ConfigError) as info:
        parse_deployment(_with(path, value), "d.yaml")
    assert info.value.field == field
    assert words in str(info.value)
    assert "d.yaml" in str(info.value)


def test_devices_on_cpu_are_refused():
    data = copy.deepcopy(GOOD)
    data["device"] = "cpu"
    with pytest.raises(ConfigError) as info:
        parse_deployment(data)
    assert info.value.field == "nodes[0].devices"


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such deployment file"):
        load_deployment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_deployment(bad)
    assert info.value.field == str(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="one mapping"):
        load_deployment(listy)


COLOCATED = {
    "model": "tiny",
    "colocated": {"instances": 2},
    "nodes": [{"role": "colocated", "index": 0}, {"role": "colocated", "index": 1}],
}


def test_a_colocated_deployment_round_trips(tmp_path):
    dep = parse_deployment(COLOCATED)
    assert dep.kind == "colocated" and dep.prefill is None and dep.decode is None
    path = tmp_path / "c.yaml"
    save_deployment(dep, path)
    assert load_deployment(path) == dep
    assert parse_deployment(GOOD).kind == "disaggregated"


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d.update(prefill={"instances": 1}), "prefill"),
        (lambda d: d.update(decode={"instances": 1}), "decode"),
        (lambda d: d["nodes"].append({"role": "decode", "index": 0}), "nodes[2].role"),
    ],
)
def test_colocated_nodes_beside_prefill_or_decode_are_refused_by_name(edit, field):
    data = copy.deepcopy(COLOCATED)
    edit(data)
    with pytest.raises(MixedDeploymentError, match="colocated") as info:
        parse_deployment(data)
    assert info.value.field == field


def test_a_colocated_node_in_a_disaggregated_deployment_is_refused():
    data = copy.deepcopy(GOOD)
    data["nodes"].append({"role": "colocated", "index": 0, "devices": [4]})
    with pytest.raises(MixedDeploymentError, match="never mixed") as info:
        parse_deployment(data)
    assert info.value.field == "nodes[3].role"


def test_a_deployment_needs_both_phases_or_colocated():
    data = copy.deepcopy(GOOD)
    del data["decode"]
    with pytest.raises(ConfigError, match="colocated") as info:
        parse_deployment(data)
    assert info.value.field == "decode"

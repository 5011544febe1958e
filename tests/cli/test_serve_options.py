"""`disagg serve --max-model-len` reaches every node's command line; bad values are refused."""

from __future__ import annotations

import argparse

import pytest

from disagg.errors import ConfigError
from disagg.serve import ServedCluster, ServeOptions
from disagg.serve_cli import add_serve_arguments, serve_options


def _options(*argv: str) -> ServeOptions:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return serve_options(p.parse_args(list(argv)))


def test_max_model_len_is_passed_to_each_node():
    cluster = ServedCluster(_options("--max-model-len", "96", "--port", "0"))
    for role in ("prefill", "decode"):
        cmd = cluster.node_command(role, f"{role}-0", 1)
        assert cmd[cmd.index("--max-model-len") + 1] == "96"


def test_without_the_flag_nodes_keep_the_models_context():
    cluster = ServedCluster(_options("--port", "0"))
    assert "--max-model-len" not in cluster.node_command("decode", "decode-0", 1)


def test_a_max_model_len_below_one_is_refused_by_name():
    with pytest.raises(ConfigError) as err:
        ServeOptions(max_model_len=0)
    assert err.value.field == "max_model_len"


def test_the_per_client_cap_flag_reaches_the_limits():
    options = _options("--max-in-flight-per-client", "3")
    assert options.client_limits is not None
    assert options.client_limits.max_in_flight_per_client == 3


def test_the_cap_flags_old_name_is_refused_naming_the_new_one():
    with pytest.raises(ConfigError) as err:
        _options("--max-queued-per-client", "3")
    assert err.value.field == "--max-queued-per-client"
    assert "--max-in-flight-per-client" in err.value.reason


def _flag(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_layout_flags_start_each_role_as_a_rank_group():
    cluster = ServedCluster(_options("--prefill-tp", "2", "--decode-pp", "2", "--port", "0"))
    prefill = cluster.node_command("prefill", "prefill-0", 1)
    decode = cluster.node_command("decode", "decode-0", 1)
    assert (
        _flag(prefill, "--tensor-parallel-size"),
        _flag(prefill, "--pipeline-parallel-size"),
    ) == ("2", "1")
    assert (_flag(decode, "--tensor-parallel-size"), _flag(decode, "--pipeline-parallel-size")) == (
        "1",
        "2",
    )
    plain = ServedCluster(_options("--port", "0")).node_command("decode", "decode-0", 1)
    assert "--tensor-parallel-size" not in plain  # a single-process node, as before


def test_a_deployments_layouts_are_served_as_written(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(
        "model: tiny\n"
        "prefill: {tp: 2, pp: 1, instances: 1}\n"
        "decode: {tp: 1, pp: 2, instances: 2}\n"
        "nodes:\n"
        "  - {role: prefill, index: 0}\n"
        "  - {role: decode, index: 0}\n"
        "  - {role: decode, index: 1}\n"
        "coordinator: {client_port: 25555, node_port: 25556}\n"
    )
    options = _options("--deployment", str(path))
    assert options.layouts == {"prefill": (2, 1), "decode": (1, 2)}
    cluster = ServedCluster(options)
    cmd = cluster.node_command("decode", "decode-1", 1)
    assert (_flag(cmd, "--tensor-parallel-size"), _flag(cmd, "--pipeline-parallel-size")) == (
        "1",
        "2",
    )


@pytest.mark.parametrize("bad", [(0, 1), (1, 0), (2.5, 1)])
def test_a_layout_below_one_is_refused_by_name(bad):
    with pytest.raises(ConfigError) as err:
        ServeOptions(layouts={"decode": bad})
    assert err.value.field == "decode_tp"

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

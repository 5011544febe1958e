"""How ``disagg serve`` maps its nodes onto GPUs (disagg/gpus.py), without a GPU."""

from __future__ import annotations

import pytest

from disagg.errors import ConfigError
from disagg.gpus import memory_shares, node_visible_devices, parent_devices, place_nodes
from disagg.serve import ServedCluster, ServeOptions

NODES = ["prefill-0", "prefill-1", "decode-0", "decode-1"]


def test_a_node_sees_the_parents_gpus_not_bare_indices():
    parent = parent_devices({"CUDA_VISIBLE_DEVICES": "4, 6,GPU-5e1d"})
    assert parent == ["4", "6", "GPU-5e1d"]
    assert node_visible_devices([0], parent) == "4"
    assert node_visible_devices([1, 2], parent) == "6,GPU-5e1d"
    assert node_visible_devices([1], parent_devices({})) == "1"  # unset: all GPUs visible
    with pytest.raises(ConfigError, match="GPU 3 is not one of the 3"):
        node_visible_devices([3], parent)


def test_nodes_share_gpus_round_robin_only_when_there_are_too_few():
    assert place_nodes(NODES, 4) == {n: [i] for i, n in enumerate(NODES)}
    # Two GPUs: each holds a prefill and a decode node.
    assert place_nodes(NODES, 2) == {
        "prefill-0": [0],
        "prefill-1": [1],
        "decode-0": [0],
        "decode-1": [1],
    }
    assert set(map(tuple, place_nodes(NODES[::2], 1).values())) == {(0,)}
    with pytest.raises(ConfigError, match="no GPU"):
        place_nodes(NODES, 0)


def test_nodes_on_a_shared_gpu_split_its_memory():
    shares = memory_shares({"prefill-0": [0], "decode-0": [0], "decode-1": [1]}, 0.9)
    assert shares == {"prefill-0": pytest.approx(0.45), "decode-0": pytest.approx(0.45)}


def test_served_nodes_get_the_parents_gpus_and_their_share(monkeypatch, tmp_path):
    cluster = ServedCluster(ServeOptions(device="cuda", port=0))
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    cluster._gpus = cluster._gpu_assignment()
    assert cluster._gpus == {"prefill-0": [0], "decode-0": [0]}
    cmd = cluster.node_command("decode", "decode-0", 1)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.4500"
    launched = {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr("subprocess.Popen", lambda cmd, env, **kw: launched.setdefault("env", env))
    cluster._spawn("decode", "decode-0")
    assert launched["env"]["CUDA_VISIBLE_DEVICES"] == "3"

"""Served clusters for end-to-end tests: real node processes on this machine."""

from __future__ import annotations

import pytest

from disagg import LLM
from disagg.serve import ServedCluster, ServeOptions

NUM_BLOCKS = 192


def start_cluster(tmp_path, **options) -> ServedCluster:
    options = {
        "port": 0,
        "num_blocks": NUM_BLOCKS,
        "threads_per_node": 1,
        "log_dir": str(tmp_path / "logs"),
        "dead_after_s": 2.0,
        "no_node_timeout_s": 10.0,
        "restart_nodes": False,  # a killed node stays dead unless a test asks otherwise
        **options,
    }
    return ServedCluster(ServeOptions(**options)).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster")
    served = start_cluster(path, events_log=str(path / "events.jsonl"))
    yield served
    served.stop(drain_timeout=5)


@pytest.fixture(scope="session")
def offline() -> LLM:
    return LLM("tiny", num_blocks=NUM_BLOCKS)

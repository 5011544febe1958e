"""``message_order``: run a transfer test over plain gloo and over gloo in NCCL's order
(``kv_transfer.in_order``), where a protocol that posts a pair's operations in an order
NCCL cannot run deadlocks instead of passing."""

from __future__ import annotations

import pytest

from kv_transfer.in_order import ENV_VAR


@pytest.fixture(params=["gloo-order", "nccl-order"])
def message_order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # Children spawned by the test inherit the environment, so both ranks agree.
    if request.param == "nccl-order":
        monkeypatch.setenv(ENV_VAR, "1")
    else:
        monkeypatch.delenv(ENV_VAR, raising=False)
    return request.param

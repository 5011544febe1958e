"""Fixtures for the client tests: a scripted fake coordinator, and a runner that drives a
coroutine on the default asyncio loop or on uvloop (every async test runs on both)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import zmq

from tests.client.fake_coordinator import FakeCoordinator

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

# Every async test is bounded, so a hang fails the test instead of the suite.
TEST_TIMEOUT_S = 10.0

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    if request.param == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(coro, TEST_TIMEOUT_S)

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@pytest.fixture
def fake() -> Iterator[FakeCoordinator]:
    with FakeCoordinator() as f:
        yield f


@pytest.fixture
def dead_address() -> str:
    """A loopback endpoint nothing listens on (bound once, then released)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind("tcp://127.0.0.1:*")
        address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    finally:
        sock.close(linger=0)
    return address

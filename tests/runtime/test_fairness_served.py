"""Fairness end to end: a heavy client (8 requests always in flight) and a light one (1
always in flight) share one decode slot. Under two-stage VTC the light client's share of
service is at least its fair share (1/2: both are backlogged whenever the slot frees)
minus the bound of docs/fairness.md; under FCFS it is visibly not."""

from __future__ import annotations

import asyncio
import time

import pytest

from disagg.client import AsyncClient
from tests.runtime.conftest import start_cluster

DURATION_S = 6.0
MAX_TOKENS = 32
PROMPT = "Once upon a time there was"
W_IN, W_OUT = 1, 2  # the default service cost


async def drive(address: str) -> tuple[dict[str, int], int]:
    served = {"heavy": 0, "light": 0}
    longest_prompt = 0

    async def worker(client: AsyncClient, cid: str, stop_at: float) -> None:
        nonlocal longest_prompt
        while time.monotonic() < stop_at:
            done = await client.generate(
                PROMPT, client_id=cid, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
            )
            longest_prompt = max(longest_prompt, len(done.prompt_token_ids))
            if time.monotonic() < stop_at:  # whole requests finished inside the window
                served[cid] += W_IN * len(done.prompt_token_ids) + W_OUT * len(done.token_ids)

    async with AsyncClient(address, timeout=120) as client:
        stop_at = time.monotonic() + DURATION_S
        await asyncio.gather(
            *(worker(client, "heavy", stop_at) for _ in range(8)), worker(client, "light", stop_at)
        )
    return served, longest_prompt


def two_stage_bound(longest_prompt: int, total_service: float, publish_interval: float) -> float:
    """2·(w_in·L_in + w_out·(M_D + 1))/w_min + 2·S, with M_D = one slot of MAX_TOKENS and
    S = the service the other pool can charge between publications (interval plus a
    message delay of the same size, at the measured service rate)."""
    m_d = MAX_TOKENS
    s = (total_service / DURATION_S) * 2 * publish_interval
    return 2 * (W_IN * longest_prompt + W_OUT * (m_d + 1)) + 2 * s


@pytest.fixture(scope="module", params=["fcfs", "two-stage-vtc"])
def measured(request, tmp_path_factory):
    cluster = start_cluster(
        tmp_path_factory.mktemp(request.param), policy=request.param, max_num_seqs=1
    )
    try:
        served, longest = asyncio.run(drive(cluster.client_address))
        interval = cluster.coordinator.settings.publish_interval_s
    finally:
        cluster.stop(drain_timeout=5)
    total = sum(served.values())
    share = served["light"] / total
    floor = 0.5 - two_stage_bound(longest, total, interval) / total
    return request.param, share, floor, served


def test_light_client_share(measured):
    policy, share, floor, served = measured
    assert 0 < floor < 0.5, (floor, served)  # the run was long enough for the bound to bite
    if policy == "two-stage-vtc":
        assert share >= floor, (share, floor, served)
    else:
        assert share < floor, (share, floor, served)  # FCFS: visibly not fair

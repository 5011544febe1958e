"""SLO-aware early rejection: a request whose predicted TTFT is far over the SLO is
refused at once with reason "slo"; the others are served."""

from __future__ import annotations

import asyncio

import pytest

from disagg.client import AsyncClient, RequestRejected
from disagg.coordinator.admission import TTFTPredictor
from disagg.errors import ConfigError
from disagg.serve import ServeOptions
from tests.runtime.conftest import start_cluster


def test_predictor_divides_the_backlog_over_nodes_at_the_measured_rate():
    p = TTFTPredictor(smoothing=0.5)
    assert p.predict(100, 1) is None  # nothing measured yet: never rejects
    p.observe_batch(1000, 0.5)  # 2000 tok/s
    p.add(3000)
    assert p.predict(1000, 1) == pytest.approx(2.0)
    assert p.predict(1000, 2) == pytest.approx(1.0)
    p.observe_batch(1000, 0.25)  # 4000 tok/s, smoothed to 3000
    p.remove(3000)
    assert p.predict(300, 1) == pytest.approx(0.1)


def test_reject_over_slo_needs_slos():
    with pytest.raises(ConfigError, match="reject_over_slo"):
        ServeOptions(reject_over_slo=2.0)


def test_burst_beyond_the_slo_is_rejected_early(tmp_path):
    cluster = start_cluster(tmp_path, slo=(1.0, 10.0), reject_over_slo=1.0)

    async def run():
        async with AsyncClient(cluster.client_address, timeout=120) as client:
            await client.generate(list(range(10, 60)), client_id="w", max_tokens=2)  # measure
            # An SLO that about five 200-token prompts in the backlog fit, whatever this
            # machine's speed: the burst of 60 must then be partly refused.
            rate = cluster.coordinator.ttft_predictor.tokens_per_s
            cluster.coordinator.settings.slo = (5 * 200 / rate, 10.0)
            return await asyncio.gather(
                *(
                    client.generate(
                        list(range(10, 210)), client_id=f"c{i % 3}", max_tokens=2, temperature=0
                    )
                    for i in range(60)
                ),
                return_exceptions=True,
            )

    try:
        results = asyncio.run(run())
    finally:
        cluster.stop(drain_timeout=5)
    rejected = [r for r in results if isinstance(r, RequestRejected)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(rejected) + len(served) == len(results), results
    assert rejected and served
    assert all(r.reason == "slo" and "predicted TTFT" in str(r) for r in rejected)

from __future__ import annotations

import pytest

from disagg.errors import ConfigError, RequestRejectedError
from disagg.scheduling import RPM, FairnessConfig, make_policy
from tests.scheduling.helpers import Req


def test_rejects_exactly_the_request_over_the_limit_in_any_60s_window():
    p = make_policy("rpm", FairnessConfig(rpm_limit=3))
    for i, t in enumerate([0.0, 10.0, 59.0]):
        p.add(Req(i, "a", t))
    with pytest.raises(RequestRejectedError, match="3 requests per minute") as info:
        p.add(Req(3, "a", 59.9))
    assert info.value.reason == "rate_limit"
    p.add(Req(4, "b", 59.9))  # other clients are not affected
    p.add(Req(5, "a", 60.0))  # the t=0 request left the window (0, 60]
    with pytest.raises(RequestRejectedError):
        p.add(Req(6, "a", 60.5))
    assert len(p) == 5  # the rejected ones were not queued


def test_per_client_limits_and_requeue_is_not_counted():
    p = RPM(1, {"vip": 2})
    p.add(Req(1, "vip", 0.0))
    p.add(Req(2, "vip", 1.0))
    with pytest.raises(RequestRejectedError):
        p.add(Req(3, "vip", 2.0))
    first = p.pop()
    p.requeue(first)  # a preempted request comes back without a new charge on the limit
    assert len(p) == 2


def test_bad_limits_name_the_field():
    with pytest.raises(ConfigError) as info:
        RPM(0)
    assert info.value.field == "rpm_limit"
    with pytest.raises(ConfigError) as info:
        RPM(5, {"a": -1})
    assert info.value.field == "rpm_limits.a"

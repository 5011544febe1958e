"""Scheduling policies: pure Python, no I/O, shared by every scheduler in the system
(the colocated engine, the prefill and decode nodes, the coordinator, the simulator)."""

from disagg.scheduling.cost import LinearCost, QuadraticCost, ServiceCost
from disagg.scheduling.factory import (
    COLOCATED_POLICIES,
    DISAGGREGATED_POLICIES,
    FairnessConfig,
    PoolPolicies,
    make_policy,
    make_pool_policies,
)
from disagg.scheduling.fcfs import FCFS
from disagg.scheduling.ledger import ServiceLedger
from disagg.scheduling.policy import Request, SchedulingPolicy
from disagg.scheduling.rpm import RPM
from disagg.scheduling.vtc import CounterOrdered, StaleView

__all__ = [
    "COLOCATED_POLICIES",
    "DISAGGREGATED_POLICIES",
    "FCFS",
    "RPM",
    "CounterOrdered",
    "FairnessConfig",
    "LinearCost",
    "PoolPolicies",
    "QuadraticCost",
    "Request",
    "SchedulingPolicy",
    "ServiceCost",
    "ServiceLedger",
    "StaleView",
    "make_policy",
    "make_pool_policies",
]

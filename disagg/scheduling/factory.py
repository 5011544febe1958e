"""Building policies by name, for one pool (colocated) or for the two pools of a
disaggregated cluster, from one :class:`FairnessConfig`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from disagg.errors import ConfigError
from disagg.scheduling.cost import LinearCost, ServiceCost
from disagg.scheduling.fcfs import FCFS
from disagg.scheduling.ledger import ServiceLedger
from disagg.scheduling.policy import SchedulingPolicy
from disagg.scheduling.rpm import RPM
from disagg.scheduling.vtc import CounterOrdered, StaleView

COLOCATED_POLICIES = ("fcfs", "lcf", "rpm", "vtc")
DISAGGREGATED_POLICIES = ("fcfs", "lcf", "rpm", "per-stage-vtc", "two-stage-vtc")


@dataclass(frozen=True)
class FairnessConfig:
    """``cost`` prices service (default w_in=1, w_out=2); ``weights`` give clients
    shares (cost is divided by the weight; unlisted clients weigh 1); ``rpm_limit``
    caps requests per minute per client for ``rpm``; ``forget_after`` (seconds) bounds
    the state kept for idle clients (on ``clock``'s time); ``stale_views`` makes each pool of two-stage VTC
    read a published snapshot (see ``StaleView``) instead of the live ledger."""

    cost: ServiceCost = field(default_factory=LinearCost)
    weights: dict[str, float] = field(default_factory=dict)
    rpm_limit: int = 60
    rpm_limits: dict[str, int] = field(default_factory=dict)
    forget_after: float | None = 600.0
    stale_views: bool = False
    clock: Callable[[], float] = time.monotonic


@dataclass
class PoolPolicies:
    """The two pools' policies, the ledgers they charge, and the stale views (if any)
    that a publication refreshes."""

    prefill: SchedulingPolicy
    decode: SchedulingPolicy
    ledgers: list[ServiceLedger] = field(default_factory=list)
    views: list[StaleView] = field(default_factory=list)

    def publish(self) -> None:
        for view in self.views:
            view.refresh()


def make_policy(name: str, config: FairnessConfig | None = None) -> SchedulingPolicy:
    """One pool serving both phases (the colocated engine)."""
    config = config or FairnessConfig()
    if name == "fcfs":
        return FCFS()
    if name == "rpm":
        return RPM(config.rpm_limit, config.rpm_limits)
    if name in ("vtc", "lcf"):
        return CounterOrdered(_ledger(config, lift=name == "vtc"), config.cost)
    if name in DISAGGREGATED_POLICIES:
        raise ConfigError(
            "policy",
            f"{name!r} needs a disaggregated cluster; colocated: {', '.join(COLOCATED_POLICIES)}",
        )
    raise ConfigError("policy", f"unknown policy {name!r}; known: {', '.join(COLOCATED_POLICIES)}")


def make_pool_policies(name: str, config: FairnessConfig | None = None) -> PoolPolicies:
    """A prefill pool (charges input) and a decode pool (charges output)."""
    config = config or FairnessConfig()
    if name == "fcfs":
        return PoolPolicies(FCFS(), FCFS())
    if name == "rpm":  # the limit applies where requests arrive: the prefill pool
        return PoolPolicies(RPM(config.rpm_limit, config.rpm_limits), FCFS())
    if name == "per-stage-vtc":
        p, d = _ledger(config, lift=True), _ledger(config, lift=True)
        return PoolPolicies(
            CounterOrdered(p, config.cost, charge_output=False),
            CounterOrdered(d, config.cost, charge_input=False),
            ledgers=[p, d],
        )
    if name in ("two-stage-vtc", "lcf"):
        # One merged ledger; a request is pending from arrival at prefill until decode
        # admission. LCF is the same without the lift.
        ledger = _ledger(config, lift=name == "two-stage-vtc")
        views = [StaleView(ledger), StaleView(ledger)] if config.stale_views else []
        return PoolPolicies(
            CounterOrdered(
                ledger,
                config.cost,
                view=views[0] if views else None,
                charge_output=False,
                ends_pending=False,
            ),
            CounterOrdered(
                ledger, config.cost, view=views[1] if views else None, charge_input=False
            ),
            ledgers=[ledger],
            views=views,
        )
    if name == "vtc":
        raise ConfigError("policy", "on a disaggregated cluster say per-stage-vtc or two-stage-vtc")
    raise ConfigError(
        "policy", f"unknown policy {name!r}; known: {', '.join(DISAGGREGATED_POLICIES)}"
    )


def _ledger(config: FairnessConfig, *, lift: bool) -> ServiceLedger:
    return ServiceLedger(
        config.weights, lift=lift, forget_after=config.forget_after, clock=config.clock
    )

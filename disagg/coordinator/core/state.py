"""The coordinator core's state: every table the job modules read and change, and the
two ways they act on the world (a reply to a client, a message to a node), both of which
only append to the outbox. No sockets, no clock: ``now`` is set by each public handler
from the time its caller passes in."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from disagg.coordinator.admission import TTFTPredictor
from disagg.coordinator.auth import ClientAccess, OpenAccess
from disagg.coordinator.core.outbox import Outbox
from disagg.coordinator.events import RequestEvents
from disagg.coordinator.metrics import CoordinatorMetrics
from disagg.coordinator.nodes import NodeState
from disagg.coordinator.tracked import Tracked
from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.protocol.cluster import _NodeMessage
from disagg.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES
from disagg.scheduling import FairnessConfig, make_policy, make_pool_policies
from disagg.scheduling.factory import PoolPolicies
from disagg.scheduling.vtc import CounterOrdered

log = logging.getLogger("disagg.coordinator")

# A pair whose KV channel broke this many times is given up (its requests recompute).
MAX_PAIR_EPOCHS = 3


@dataclass
class CoordinatorSettings:
    client_address: str = "tcp://127.0.0.1:5555"
    node_address: str = "tcp://127.0.0.1:5556"
    policy: str = "two-stage-vtc"
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    cluster_secret: str | None = None
    dead_after_s: float = 3.0  # a node silent this long is dead
    no_node_timeout_s: float = 30.0  # a request with no live node of its kind fails after
    kv_lease_s: float = 60.0  # prefilled KV not pulled by then is released
    publish_interval_s: float = 0.05
    max_attempts: int = 3  # runs a request may fail before it fails for the client
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_in_flight_per_client: int = 10_000
    slo: tuple[float, float] | None = None  # (TTFT s, TPOT s) tracked per client, live
    # With an SLO: refuse a request whose predicted TTFT is over this factor x the TTFT SLO.
    reject_over_slo: float | None = None
    curve_secret_key: str | None = None  # CurveZMQ keypair file: both endpoints encrypted
    events_log: str | None = None  # append each ended request's events here (JSON lines)
    colocated: bool = False  # colocated nodes only (prefill/decode nodes are refused)


# Single-stage VTC on a colocated cluster: what each cluster policy becomes there.
COLOCATED_POLICY = {"per-stage-vtc": "vtc", "two-stage-vtc": "vtc"}


def colocated_pool(policy: str, fairness: FairnessConfig) -> PoolPolicies:
    """A colocated cluster's one pool: one policy as both pools (the same object), so
    input and output are charged to one counter per client."""
    one = make_policy(COLOCATED_POLICY.get(policy, policy), fairness)
    ledgers = [one.ledger] if isinstance(one, CounterOrdered) else []
    return PoolPolicies(one, one, ledgers=ledgers)


class CoreState:
    """The tables. Job modules (intake, dispatch, kv, endings, failures, node_reports)
    are mixins over this state; ``CoordinatorCore`` puts them together."""

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer | None,
        settings: CoordinatorSettings,
        *,
        access: ClientAccess | None,
        metrics: CoordinatorMetrics | None,
        events: RequestEvents,
        now: float,
    ):
        self.settings = s = settings
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.access: ClientAccess = access if access is not None else OpenAccess(s.fairness.weights)
        self.metrics = metrics
        self.events = events
        self.now = now  # the time of the message being handled
        self.outbox = Outbox()
        # (client, total seconds, seconds in model steps) of the last finished requests
        self.finished_log: deque[tuple[str, float, float]] = deque(maxlen=100_000)
        # (prefill endpoint, decode endpoint) -> the epoch of their KV channel
        self.pair_epochs: dict[tuple[str, str], int] = {}
        self.pools = (
            colocated_pool(s.policy, s.fairness)
            if s.colocated
            else make_pool_policies(s.policy, s.fairness)
        )
        self.nodes: dict[str, NodeState] = {}
        self.by_identity: dict[bytes, NodeState] = {}
        self.model_fingerprint: str | None = None
        self.requests: dict[int, Tracked] = {}
        self.by_client_key: dict[tuple[bytes, str], Tracked] = {}
        self.in_flight_per_client: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}  # per-key rate limits: arrival times
        self.ttft_predictor = TTFTPredictor()
        self._rids = itertools.count(1)
        self._published_versions: tuple[int, ...] = ()
        self._published_at = float("-inf")
        self.accepting = True
        # Service charged since it was last exported to the metrics, by stage and client
        # (exported once per tick: a metric update takes a lock, and these come per
        # request and per token).
        self.charges: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
        self._cost_out_one = self._cost_out(1)  # the metrics' charge of one output token
        # (kv_since, rid) of each prefilled KV held for a pull, earliest lease end first
        # (entries of requests pulled or gone since are dropped when they come up)
        self._kv_leases: list[tuple[float, int]] = []
        self._unplaced = False  # some request waits with no live node of its kind

    # -- acting: only ever appends to the outbox --------------------------------------

    def _reply(self, identity: bytes, msg: Any) -> None:
        self.outbox.clients.append((identity, msg))

    def _send_node(self, node: NodeState, msg: _NodeMessage) -> None:
        self.outbox.nodes.append((node.identity, msg))

    # -- small shared reads -------------------------------------------------------------

    def live_nodes(self, role: str | None = None) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.alive and (role is None or n.role == role)]

    def max_model_len(self) -> int:
        lens = [n.max_model_len for n in self.nodes.values()]
        return min(lens) if lens else self.model_config.max_context

    def _counter_of(self, policy: Any, client: str) -> float:
        return policy.view.counter(client) if isinstance(policy, CounterOrdered) else 0.0

    def _counters(self, role: str) -> dict[str, float]:
        policy = self.pools.prefill if role == "prefill" else self.pools.decode
        return policy.ledger.counters() if isinstance(policy, CounterOrdered) else {}

    def _charged(self, stage: str, client: str, amount: float) -> None:
        """``amount`` of service charged to ``client`` at ``stage``, for the metrics."""
        if self.metrics:
            charges = self.charges[stage]
            charges[client] = charges.get(client, 0.0) + amount

    def _cost_in(self, n: int) -> float:
        return self.settings.fairness.cost(n, 0)

    def _cost_out(self, n: int) -> float:
        cost = self.settings.fairness.cost
        return cost(0, n) - cost(0, 0)

    def _leave_prefill_backlog(self, t: Tracked) -> None:
        if t.in_prefill_backlog:
            t.in_prefill_backlog = False
            self.ttft_predictor.remove(t.num_prompt_tokens)

    def _given_up(self, pair: tuple[str, str]) -> bool:
        return self.pair_epochs.get(pair, 0) >= MAX_PAIR_EPOCHS

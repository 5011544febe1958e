"""The coordinator's core: every decision, no I/O.

Each public handler takes one message (or a timer tick) and the time, and returns the
messages it decided to send as an :class:`Outbox`. The shell (``disagg.coordinator.server``)
owns the sockets and the clock; tests drive the core directly, deterministically.

The jobs live in one module each, stacked as mixins over :class:`CoreState`:
``endings`` (a request's one final reply) < ``failures`` (lost work, timers' checks) <
``kv`` (hand-off pairing and epochs) < ``node_reports`` (node messages); ``intake``
(client messages) and ``dispatch`` (pool queues, credit, publications) beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from disagg.coordinator.auth import ClientAccess
from disagg.coordinator.core.dispatch import Dispatch
from disagg.coordinator.core.intake import Intake
from disagg.coordinator.core.node_reports import NodeReports
from disagg.coordinator.core.outbox import Outbox
from disagg.coordinator.core.state import MAX_PAIR_EPOCHS, CoordinatorSettings
from disagg.coordinator.events import RequestEvents
from disagg.coordinator.metrics import CoordinatorMetrics
from disagg.coordinator.nodes import NodeState
from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.protocol.cluster import Register, Shutdown

__all__ = ["MAX_PAIR_EPOCHS", "CoordinatorCore", "CoordinatorSettings", "NodeObserver", "Outbox"]

log = logging.getLogger("disagg.coordinator")

# Called with (node, message, now) for every message from a registered live node, before
# the core handles it (the planner's calibration records batches and steps this way).
NodeObserver = Callable[[NodeState, Any, float], None]


class CoordinatorCore(NodeReports, Intake, Dispatch):
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer | None,
        settings: CoordinatorSettings | None = None,
        *,
        access: ClientAccess | None = None,
        metrics: CoordinatorMetrics | None = None,
        events: RequestEvents | None = None,
        now: float = 0.0,
    ):
        super().__init__(
            model_config,
            tokenizer,
            settings or CoordinatorSettings(),
            access=access,
            metrics=metrics,
            events=events if events is not None else RequestEvents(),
            now=now,
        )
        self._observers: list[NodeObserver] = []

    def add_node_observer(self, observer: NodeObserver) -> None:
        self._observers.append(observer)

    # -- the handlers ------------------------------------------------------------------

    def on_client(self, identity: bytes, msg: Any, now: float) -> Outbox:
        """A decoded client message (``Generate``, ``Abort``, ``Ping``) from ``identity``."""
        self.now = now
        self._on_client_message(identity, msg)
        return self.outbox.take()

    def on_node(self, identity: bytes, msg: Any, now: float) -> Outbox:
        """A decoded node message from the node whose routing id is ``identity``."""
        self.now = now
        if isinstance(msg, Register):
            self._on_register(identity, msg)
            return self.outbox.take()
        node = self.by_identity.get(identity)
        if node is None or not node.alive:
            return self.outbox.take()  # a node declared dead, or never met: it must register
        node.last_seen = now
        try:
            for observe in self._observers:
                observe(node, msg, now)
            self._on_node_message(node, msg)
        except Exception:  # a bug in one message's handling must not stop the service
            log.exception("handling %s from %s", msg.type, node.node_id)
        return self.outbox.take()

    def _export_charges(self) -> None:
        if self.metrics is None:
            return
        for stage, charges in self.charges.items():
            for client, amount in charges.items():
                self.metrics.charge(client, stage, amount)  # type: ignore[arg-type]
            charges.clear()

    def dispatch(self, now: float) -> Outbox:
        """Hands queued requests to nodes with room (after a batch of messages)."""
        self.now = now
        self._dispatch()
        return self.outbox.take()

    def tick(self, now: float) -> Outbox:
        """The timers: silent nodes declared dead, bounded waits and KV leases, the
        counters published (when changed, or as a heartbeat), then dispatch; the output
        charged since the last tick goes to the metrics (summed per client: once per
        tick, not per node message)."""
        self.now = now
        self._check_nodes()
        self._check_waits()
        self._publish()
        self._dispatch()
        self._export_charges()
        return self.outbox.take()

    def node_process_exited(self, node_id: str, pid: int, returncode: int, now: float) -> Outbox:
        """Whoever runs node processes saw ``pid`` (running ``node_id``) exit: that node is
        gone now, without waiting for its heartbeats to stop."""
        self.now = now
        node = self.nodes.get(node_id)
        if node is not None and node.alive and node.pid == pid:
            self._node_lost(node, f"its process exited with {returncode}")
        return self.outbox.take()

    def stop_accepting(self) -> None:
        self.accepting = False

    def fail_all(self, exc: Exception, now: float) -> tuple[int, Outbox]:
        """Fails every request in flight with ``exc``; returns how many."""
        self.now = now
        left = list(self.requests.values())
        for t in left:
            self._fail(t, exc, release=True)
        self._export_charges()
        return len(left), self.outbox.take()

    def shutdown_nodes(self) -> Outbox:
        for node in self.live_nodes():
            self._send_node(node, Shutdown())
        return self.outbox.take()

"""Dispatch and credit: each pool's policy queue is drained in its order to the node of
that kind with the most room (a head that does not fit waits; it is not overtaken);
input is charged when the prefill pool first admits a request. A colocated cluster has
one pool, drained to colocated nodes; their input is charged when the node reports the
request admitted (``node_reports``). And the publication of the counters to every
node."""

from __future__ import annotations

from typing import Any

from disagg.coordinator.core.state import CoreState
from disagg.coordinator.nodes import NodeState
from disagg.coordinator.tracked import Phase, Tracked
from disagg.protocol.cluster import Counters, DecodeTask, PrefillTask, Release
from disagg.protocol.messages import made_here

# Unchanged counters are sent again after this long: the coordinator's heartbeat.
HEARTBEAT_S = 1.0


class Dispatch(CoreState):
    def _dispatch(self) -> None:
        if self.settings.colocated:
            self._dispatch_colocated()
        self._dispatch_prefill()
        self._dispatch_decode()
        if self.metrics:
            self.metrics.set_queue_depth("prefill", len(self.pools.prefill))
            self.metrics.set_queue_depth("decode", len(self.pools.decode))

    def _dispatch_prefill(self) -> None:
        policy = self.pools.prefill
        nodes = self.live_nodes("prefill")
        if not nodes:
            return
        while (t := policy.peek()) is not None:
            node = max(nodes, key=NodeState.available)
            need = node.blocks_tokens(t.num_prompt_tokens)
            if node.available() < need:
                break  # the head waits for room; it is not overtaken
            policy.pop()
            if not t.input_charged:
                policy.on_admitted(t, t.num_prompt_tokens)
                t.input_charged = True
                self._charged("prefill", t.client_id, self._cost_in(t.num_prompt_tokens))
            t.phase, t.prefill_node = Phase.PREFILLING, node.node_id
            t.dispatched_at = t.dispatched_at or self.now
            node.requests.add(t.rid)
            self.events.record(str(t.rid), "dispatched", node_id=node.node_id, t=self.now)
            self._send_node(
                node,
                made_here(  # (every value ours, or validated as the same type)
                    PrefillTask,
                    task=node.reserve(need),
                    rid=t.rid,
                    client_id=t.client_id,
                    prompt_token_ids=t.prompt_token_ids,
                    sampling=t.sampling,
                    counter=self._counter_of(policy, t.client_id),
                    arrival=t.arrival_time,
                ),
            )

    def _dispatch_decode(self) -> None:
        policy = self.pools.decode
        nodes = self.live_nodes("decode")
        if not nodes:
            return
        while (head := self._take_head(policy, nodes)) is not None:
            t, node, need = head
            holder = self.nodes.get(t.kv_node) if t.kv_node else None
            source = holder.endpoint if holder is not None and holder.alive else None
            if holder is not None and source and self._given_up((source, node.endpoint)):
                self._send_node(holder, Release(rid=t.rid))  # that channel was given up:
                holder.requests.discard(t.rid)  # recompute instead of pulling
                t.kv_node, source = None, None
            t.phase, t.decode_node, t.pull_started = Phase.DECODING, node.node_id, False
            node.requests.add(t.rid)
            self._send_decode_task(node, t, need, policy, source)

    def _dispatch_colocated(self) -> None:
        """The one queue, in its order, to the colocated node with the most room, as a
        task without a KV source: the node prefills prompt + the tokens already sent
        (none, or those of a node that died) and decodes."""
        policy = self.pools.prefill
        nodes = self.live_nodes("colocated")
        if not nodes:
            return
        while (head := self._take_head(policy, nodes)) is not None:
            t, node, need = head
            if not t.output_token_ids:
                t.prefill_node = node.node_id
            t.phase, t.decode_node = Phase.DECODING, node.node_id
            t.dispatched_at = t.dispatched_at or self.now
            node.requests.add(t.rid)
            self.events.record(str(t.rid), "dispatched", node_id=node.node_id, t=self.now)
            self._send_decode_task(node, t, need, policy)

    def _take_head(
        self, policy: Any, nodes: list[NodeState]
    ) -> tuple[Tracked, NodeState, int] | None:
        """The queue's head and the live node with the most room, taken off the queue if
        it fits there; a head that does not fit waits and is not overtaken."""
        t = policy.peek()
        if t is None:
            return None
        node = max(nodes, key=NodeState.available)
        need = node.blocks_tokens(t.num_prompt_tokens + t.num_output_tokens + 1)
        if node.available() < need:
            return None
        policy.pop()
        return t, node, need

    def _send_decode_task(
        self, node: NodeState, t: Tracked, need: int, policy: Any, source: str | None = None
    ) -> None:
        """A decode or colocated task: resume from the prompt and the tokens already
        sent, pulling the KV from ``source`` when one holds it."""
        self._send_node(
            node,
            made_here(  # (every value ours, or validated as the same type)
                DecodeTask,
                task=node.reserve(need),
                rid=t.rid,
                client_id=t.client_id,
                prompt_token_ids=t.prompt_token_ids,
                output_token_ids=list(t.output_token_ids),  # (a copy: it grows)
                sampling=t.sampling,
                counter=self._counter_of(policy, t.client_id),
                arrival=t.arrival_time,
                source=source,
                text_chars=t.text_chars,
            ),
        )

    def _publish(self) -> None:
        versions = tuple(ledger.version for ledger in self.pools.ledgers)
        now = self.now
        if versions == self._published_versions and now - self._published_at < HEARTBEAT_S:
            return
        self._published_versions, self._published_at = versions, now
        self.pools.publish()
        by_role = {role: self._counters(role) for role in ("prefill", "decode")}
        by_role["colocated"] = by_role["prefill"]  # one pool: prefill and decode are it
        for node in self.live_nodes():
            self._send_node(node, Counters(values=by_role[node.role]))
        if self.metrics:
            for client, value in by_role["decode"].items():
                self.metrics.set_counter(client, value)

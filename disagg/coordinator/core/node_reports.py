"""Node messages: registration (the cluster secret, one model, one role per id, a new
incarnation replacing a live one), credit, prefill results and decode steps (tokens
charged and forwarded exactly once: a stale or repeated report is dropped), and the
hand-off and failure reports (delegated to ``kv`` and ``failures``); a colocated node's
``Admitted`` charges its requests' input, once each."""

from __future__ import annotations

import heapq
from typing import Any

from disagg.coordinator.auth import check_cluster_secret
from disagg.coordinator.core.kv import KVPairing
from disagg.coordinator.core.state import log
from disagg.coordinator.nodes import NodeState
from disagg.coordinator.tracked import Phase, Tracked
from disagg.engine.parallel.handoff import IncompatibleNodesError, check_compatible
from disagg.protocol.cluster import (
    Admitted,
    Credit,
    Goodbye,
    Prefilled,
    PrefillResult,
    Pulled,
    PullRequest,
    Pushed,
    Refused,
    Register,
    Release,
    StepTokens,
    TaskFailed,
    Welcome,
)


class NodeReports(KVPairing):
    def _on_register(self, identity: bytes, msg: Register) -> None:
        existing = self.nodes.get(msg.node_id)
        if existing is not None and existing.alive and existing.endpoint == msg.endpoint:
            self._send_node(
                existing, Welcome(node_id=msg.node_id, counters=self._counters(msg.role))
            )
            return  # a repeated hello
        reason = None
        if not check_cluster_secret(self.settings.cluster_secret, msg.secret):
            reason = "wrong or missing cluster secret"
        elif self.model_fingerprint not in (None, msg.model):
            reason = f"model {msg.model} differs from the cluster's {self.model_fingerprint}"
        elif (msg.role == "colocated") != self.settings.colocated:
            reason = (
                f"a {msg.role} node in a "
                f"{'colocated' if self.settings.colocated else 'disaggregated'} cluster: "
                "colocated nodes are never mixed with prefill/decode nodes (no fairness "
                "bound is stated for the mix)"
            )
        elif existing is not None and existing.alive and existing.role != msg.role:
            reason = f"a live {existing.role} node is already registered as {msg.node_id}"
        else:
            reason = self._kv_mismatch(msg)
        if reason is None and existing is not None and existing.alive:
            # A new process under a live node's id (restarted before its heartbeats were
            # missed). Its routing id is the node id, so ZeroMQ already routes to the new
            # connection: the old process can no longer be reached, and what it held is lost.
            self._node_lost(existing, f"replaced by a new process ({msg.endpoint})")
        if reason is not None:
            log.warning("refused node %s: %s", msg.node_id, reason)
            self.outbox.nodes.append((identity, Refused(reason=reason)))
            return
        self.model_fingerprint = msg.model
        node = NodeState.from_register(identity, msg, self.now)
        self.nodes[msg.node_id] = node
        self.by_identity[identity] = node
        log.info("node %s (%s, %s) joined", msg.node_id, msg.role, msg.endpoint)
        if self.metrics:
            self.metrics.set_node_alive(node.node_id, node.role, True)
        self._send_node(node, Welcome(node_id=msg.node_id, counters=self._counters(msg.role)))

    def _kv_mismatch(self, msg: Register) -> str | None:
        """Why ``msg``'s node could not hand KV to (or take it from) a live node of the
        other role — a different block size, KV dtype or shape, or a layout its model
        cannot take — checked once here, never per request. None: it can."""
        if msg.role not in ("prefill", "decode"):
            return None
        way = "to" if msg.role == "prefill" else "from"
        for other in self.nodes.values():
            if not other.alive or other.role == msg.role or other.node_id == msg.node_id:
                continue
            if msg.block_size != other.block_size:
                return (
                    f"its KV cannot be handed {way} {other.role} node {other.node_id}: "
                    f"block_size {msg.block_size} differs from its {other.block_size}"
                )
            if msg.kv is None or other.kv is None:  # simulated nodes move no KV
                continue
            prefill, decode = (msg.kv, other.kv) if msg.role == "prefill" else (other.kv, msg.kv)
            try:
                check_compatible(prefill, decode)
            except IncompatibleNodesError as e:
                return f"its KV cannot be handed {way} {other.role} node {other.node_id}: {e}"
        return None

    def _on_node_message(self, node: NodeState, msg: Any) -> None:
        if isinstance(msg, Credit):
            node.update(msg, self.now)
        elif isinstance(msg, Prefilled):
            if msg.results:
                tokens = sum(
                    self.requests[r.rid].num_prompt_tokens
                    for r in msg.results
                    if r.rid in self.requests
                )
                self.ttft_predictor.observe_batch(tokens, msg.results[0].prefill_s)
                node.model_s += msg.results[0].prefill_s
            for result in msg.results:
                self._on_prefilled(node, result)
        elif isinstance(msg, StepTokens):
            node.model_s += msg.step_s
            self._on_step(node, msg)
            if msg.preempted and self.metrics:
                for _ in msg.preempted:
                    self.metrics.preemption(node.node_id)
        elif isinstance(msg, Admitted):
            self._on_admitted(node, msg.rids)
        elif isinstance(msg, PullRequest):
            self._on_pull_request(node, msg.rids)
        elif isinstance(msg, Pushed):
            self._on_pushed(node, msg)
        elif isinstance(msg, Pulled):
            self._on_pulled(node, msg)
        elif isinstance(msg, TaskFailed):
            self._on_task_failed(node, msg)
        elif isinstance(msg, Goodbye):
            self._node_lost(node, "said goodbye")

    def _on_prefilled(self, node: NodeState, r: PrefillResult) -> None:
        t = self.requests.get(r.rid)
        if t is None or t.phase is not Phase.PREFILLING or t.prefill_node != node.node_id:
            if r.finish_reason is None:
                self._send_node(node, Release(rid=r.rid))  # aborted or re-dispatched meanwhile
            return
        self.events.record(str(t.rid), "prefill_start", node_id=node.node_id, t=r.prefill_start)
        self.events.record(
            str(t.rid), "prefill_end", node_id=node.node_id, t=r.prefill_start + r.prefill_s
        )
        t.model_s += r.prefill_s
        self._leave_prefill_backlog(t)
        if r.finish_reason is not None:
            node.requests.discard(t.rid)
        else:
            t.kv_node, t.kv_since = node.node_id, self.now
            heapq.heappush(self._kv_leases, (self.now, t.rid))
        self._take_token(t, r.first_token, r.text)
        self._charge_output({t: 1})
        if r.finish_reason is not None:
            self._finish(t, r.finish_reason, text_end=r.text_end)
            return
        t.phase = Phase.WAITING_DECODE
        self.pools.decode.add(t)

    def _on_admitted(self, node: NodeState, rids: list[int]) -> None:
        """A colocated node admitted ``rids``: their input is charged now, once."""
        policy = self.pools.prefill
        for rid in rids:
            t = self.requests.get(rid)
            if t is None or t.decode_node != node.node_id or t.phase is not Phase.DECODING:
                continue
            self._leave_prefill_backlog(t)
            if not t.input_charged:
                policy.on_admitted(t, t.num_prompt_tokens)
                t.input_charged = True
                self._charged("prefill", t.client_id, self._cost_in(t.num_prompt_tokens))

    def _on_step(self, node: NodeState, msg: StepTokens) -> None:
        """Each token charged and forwarded once, in order: a token already had (a
        repeated report) is dropped, one past a gap is refused. The step's charges are
        made per request at once, before any of its requests ends (the path every
        streamed token takes: kept to a few list and dictionary operations a token)."""
        requests, node_id, step_s, now = self.requests, node.node_id, msg.step_s, self.now
        ends = {e.rid: e for e in msg.finished}
        # An ending comes with its request's last token in the message: index of that.
        ending_at = (
            {r: i for r, i in zip(msg.rids, msg.indices, strict=True) if r in ends} if ends else {}
        )
        decoding = Phase.DECODING
        counts: dict[Tracked, int] = {}  # tokens taken this step, by request (to charge)
        for rid, index, token, text in zip(
            msg.rids, msg.indices, msg.tokens, msg.texts, strict=True
        ):
            t = requests.get(rid)
            if t is None or t.decode_node != node_id or t.phase is not decoding:
                continue  # a stale report (aborted, or moved after its node was declared dead)
            taken = counts.get(t)
            if taken is None:  # a request's model time counts each step once
                t.model_s += step_s
                taken = counts[t] = 0
            out = t.output_token_ids
            have = len(out)
            if index != have:
                if index > have:
                    log.error("request %d: token %d but %d sent; dropped", rid, index, have)
                continue
            if have == 1:
                self.events.record(str(rid), "decode_start", node_id=node_id, t=now)
            self._take_token(t, token, text)
            counts[t] = taken + 1
            if ending_at and ending_at.get(rid) == index:
                self._charge_output(counts)  # before the ending leaves its client's queue
                counts = {}
                node.requests.discard(rid)
                self.events.record(str(rid), "decode_end", node_id=node_id, t=now)
                self._finish(t, ends[rid].finish_reason, text_end=ends[rid].text_end)
        if counts:
            self._charge_output(counts)

    def _charge_output(self, counts: dict[Tracked, int]) -> None:
        """Charges each request's new output tokens (the decode pool's policy, and the
        per-client sums the metrics export each tick)."""
        self.pools.decode.on_tokens_of(counts)
        if self.metrics:
            charges, one = self.charges["decode"], self._cost_out_one
            for t, n in counts.items():
                charges[t.client_id] = charges.get(t.client_id, 0.0) + one * n

    def _take_token(self, t: Tracked, token: int, text: str) -> None:
        """Appends ``token`` (the next one) with its text and streams it; the caller
        charges it (:meth:`_charge_output`)."""
        index = len(t.output_token_ids)
        t.output_token_ids.append(token)
        if text:
            t.text_parts.append(text)
            t.text_chars += len(text)
        if t.first_token_at is None:
            t.first_token_at = self.now
        if t.stream:
            self.outbox.stream(t.identity).add(t.request_id, index, token, text)

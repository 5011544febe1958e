"""When work is lost: a task that failed on its node (retried up to ``max_attempts``), a
node gone (its requests re-dispatched: not yet prefilled -> prefilled again elsewhere;
prefilled or mid-decode -> resumed on a decode node from the prompt and the tokens
already sent, so a client's stream never has a gap or a repeat), and the timers' checks
(silent nodes, requests with no node of their kind, KV leases)."""

from __future__ import annotations

import heapq
import logging

from disagg.coordinator.core.endings import Endings
from disagg.coordinator.core.state import log
from disagg.coordinator.nodes import NodeState
from disagg.coordinator.tracked import Phase, Tracked
from disagg.errors import ServerUnavailable
from disagg.protocol.cluster import Release, SourceLost, TaskFailed


class Failures(Endings):
    def _on_task_failed(self, node: NodeState, msg: TaskFailed) -> None:
        node.requests.discard(msg.rid)
        t = self.requests.get(msg.rid)
        if t is None:
            return
        owner = t.prefill_node if t.phase is Phase.PREFILLING else t.decode_node
        if owner != node.node_id:
            return
        t.attempts += 1
        log.warning("request %d failed on %s: %s", t.rid, node.node_id, msg.message)
        if t.attempts >= self.settings.max_attempts:
            self._fail(
                t, RuntimeError(f"failed {t.attempts} times; last: {msg.message}"), release=True
            )
            return
        self._redispatch(t)

    def _node_lost(self, node: NodeState, why: str) -> None:
        if not node.alive:
            return
        node.alive = False
        log.log(
            logging.WARNING if node.requests else logging.INFO,  # leaving idle is no news
            "node %s (%s) is gone: %s; re-dispatching %d requests",
            node.node_id,
            node.role,
            why,
            len(node.requests),
        )
        if self.metrics:
            self.metrics.set_node_alive(node.node_id, node.role, False)
        for rid in list(node.requests):
            t = self.requests.get(rid)
            if t is None:
                continue
            if t.kv_node == node.node_id:
                t.kv_node = None
                # Also when its pull is under way: a receive from a dead process can wait
                # out the transfer timeout, and the decode node goes on without it.
                self._tell_decoder_source_lost(t)
            if (t.phase is Phase.PREFILLING and t.prefill_node == node.node_id) or (
                t.phase is Phase.DECODING and t.decode_node == node.node_id
            ):
                self._redispatch(t)
        node.requests.clear()

    def _tell_decoder_source_lost(self, t: Tracked) -> None:
        if t.phase is Phase.DECODING and t.decode_node:
            decoder = self.nodes.get(t.decode_node)
            if decoder is not None and decoder.alive:
                self._send_node(decoder, SourceLost(rid=t.rid))

    def _release_held_kv(self, t: Tracked) -> None:
        """The prefill node holding ``t``'s KV frees it (nobody will pull it)."""
        holder = self.nodes.get(t.kv_node) if t.kv_node else None
        if holder is not None and holder.alive:
            self._send_node(holder, Release(rid=t.rid))
            holder.requests.discard(t.rid)
        t.kv_node = None

    def _redispatch(self, t: Tracked) -> None:
        """Back to the queue it needs: prefill again if no token was produced yet, else
        resume on a decode node from the tokens already sent."""
        if t.kv_node is not None:
            self._release_held_kv(t)
        t.decode_node = None
        t.pull_started = False
        if t.output_token_ids:
            t.phase = Phase.WAITING_DECODE
            self.pools.decode.requeue(t)
        else:
            t.phase = Phase.QUEUED
            t.prefill_node = None
            self.pools.prefill.requeue(t)

    # -- the timers' checks -------------------------------------------------------------

    def _check_nodes(self) -> None:
        now = self.now
        for node in self.live_nodes():
            if now - node.last_seen > self.settings.dead_after_s:
                self._node_lost(node, f"silent for {now - node.last_seen:.1f} s")

    def _check_waits(self) -> None:
        """Requests with no live node of the kind they need fail after the bounded wait;
        prefilled KV nobody pulled within the lease is released. Costs nothing per
        request in flight while every kind has a live node and no lease is due (this
        runs every tick, and a large cluster has many thousands of requests in flight)."""
        now, s = self.now, self.settings
        kinds = ("colocated",) if s.colocated else ("prefill", "decode")
        missing = {kind for kind in kinds if not self.live_nodes(kind)}
        if missing or self._unplaced:
            self._check_unplaced(missing)
        leases, later = self._kv_leases, []
        while leases and now - leases[0][0] > s.kv_lease_s:
            since, rid = heapq.heappop(leases)
            t = self.requests.get(rid)
            if t is None or not t.kv_node or t.kv_since != since or t.pull_started:
                continue  # pulled, released or re-prefilled since
            if t.unplaced_since is not None:  # fails by its bounded wait instead
                later.append((since, rid))
                continue
            self._release_held_kv(t)
            self._tell_decoder_source_lost(t)
        for entry in later:
            heapq.heappush(leases, entry)

    def _check_unplaced(self, missing: set[str]) -> None:
        now, s = self.now, self.settings
        self._unplaced = False
        for t in list(self.requests.values()):
            need = {Phase.QUEUED: "prefill", Phase.WAITING_DECODE: "decode"}.get(t.phase)
            if need is not None and s.colocated:
                need = "colocated"
            if need is None or need not in missing:
                t.unplaced_since = None
                continue
            if t.unplaced_since is None:
                t.unplaced_since = now
            elif now - t.unplaced_since > s.no_node_timeout_s:
                self._fail(
                    t,
                    ServerUnavailable(
                        f"no live {need} node for {s.no_node_timeout_s:.0f} s", address=""
                    ),
                    release=True,
                )
                continue
            self._unplaced = True

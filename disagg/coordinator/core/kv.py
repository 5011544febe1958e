"""KV hand-off between a prefill node and a decode node: pairing each pull with the
holder (one Push/PullGo pair per prefill node), the epochs of a pair's channel (a break
moves it to the next; after ``MAX_PAIR_EPOCHS`` the pair is given up and its requests
recompute), and the reports of pushes and pulls."""

from __future__ import annotations

from disagg.coordinator.core.failures import Failures
from disagg.coordinator.core.state import log
from disagg.coordinator.nodes import NodeState
from disagg.protocol.cluster import Pulled, PullGo, Push, Pushed, Release, SourceLost


class KVPairing(Failures):
    def _on_pull_request(self, node: NodeState, rids: list[int]) -> None:
        by_source: dict[str, list[int]] = {}
        for rid in rids:
            t = self.requests.get(rid)
            if t is None or t.decode_node != node.node_id:
                self._send_node(node, Release(rid=rid))
                continue
            source = self.nodes.get(t.kv_node) if t.kv_node else None
            if source is None or not source.alive or t.pull_started:
                self._send_node(node, SourceLost(rid=rid))
                continue
            if self._given_up((source.endpoint, node.endpoint)):
                self._send_node(node, SourceLost(rid=rid))  # recompute instead
                continue
            t.pull_started = True
            self.events.record(str(rid), "transfer_start", node_id=node.node_id, t=self.now)
            by_source.setdefault(source.node_id, []).append(rid)
        for source_id, group in by_source.items():
            source = self.nodes[source_id]
            epoch = self.pair_epochs.get((source.endpoint, node.endpoint), 0)
            (dtp, dpp), (ptp, ppp) = node.layout, source.layout
            push = Push(rids=group, dest=node.endpoint, epoch=epoch, peer_tp=dtp, peer_pp=dpp)
            pull = PullGo(rids=group, source=source.endpoint, epoch=epoch, peer_tp=ptp, peer_pp=ppp)
            self._send_node(source, push)
            self._send_node(node, pull)

    def _channel_broke(self, pair: tuple[str, str], epoch: int, reported_by: str) -> None:
        """A side of ``pair`` (prefill endpoint, decode endpoint) found the channel of
        ``epoch`` broken: the pair's next transfer forms a fresh one (once per epoch,
        whichever side reports first)."""
        if self.pair_epochs.get(pair, 0) != epoch:
            return
        self.pair_epochs[pair] = epoch + 1
        log.warning(
            "KV channel %s -> %s broke at epoch %d (reported by %s)%s",
            *pair, epoch, reported_by,
            "; given up: its requests recompute" if self._given_up(pair)
            else "; the next transfer forms it again",
        )  # fmt: skip

    def _on_pushed(self, node: NodeState, msg: Pushed) -> None:
        if msg.broken_peer and msg.dest is not None:
            self._channel_broke((node.endpoint, msg.dest), msg.epoch, node.node_id)
        for rid in msg.rids:
            node.requests.discard(rid)
            t = self.requests.get(rid)
            if t is not None and t.kv_node == node.node_id:
                t.kv_node = None
        if msg.error is None and self.metrics:
            self.metrics.kv_transfer(msg.bytes, msg.seconds)

    def _on_pulled(self, node: NodeState, msg: Pulled) -> None:
        if msg.broken_peer and msg.source is not None:
            self._channel_broke((msg.source, node.endpoint), msg.epoch, node.node_id)
        for rid in msg.rids:
            t = self.requests.get(rid)
            if t is None or t.decode_node != node.node_id:
                continue
            self.events.record(str(t.rid), "transfer_end", node_id=node.node_id, t=self.now)
            if msg.error is None:
                t.transfer_s = msg.seconds
            else:
                log.warning(
                    "request %d: KV pull failed (%s); recomputed on %s",
                    t.rid,
                    msg.error,
                    node.node_id,
                )

"""A request's one ending: ``Finished`` (with the text the nodes streamed), an
``Error``, or nothing (aborted); either way everything any node holds of it is released
and it is forgotten."""

from __future__ import annotations

from disagg.coordinator.core.state import CoreState
from disagg.coordinator.tracked import Phase, Tracked
from disagg.protocol import Finished, Nodes, Timings, error_from_exception
from disagg.protocol.cluster import Release


class Endings(CoreState):
    def _finish(
        self, t: Tracked, reason: str, *, text_end: int | None = None, reply: bool = True
    ) -> None:
        self._release_everywhere(t)
        t.finished_at = self.now
        self.events.record(str(t.rid), "finished", t=self.now)
        if not reply:  # aborted: no reply, but the ending is counted like any other
            if self.metrics:
                self.metrics.request_finished(t.client_id, reason, None, None)
            return
        # The nodes' texts add up to the whole output decoded (their last one carries
        # what they held back); a stop string cuts it where the node found it.
        text = "".join(t.text_parts)
        if text_end is not None:
            text = text[:text_end]
        timings = self._timings(t)
        self.finished_log.append((t.client_id, timings.total_s or 0.0, t.model_s))
        self._reply(
            t.identity,
            Finished(
                request_id=t.request_id,
                finish_reason=reason,  # type: ignore[arg-type]
                token_ids=t.output_token_ids,
                text=text,
                prompt_token_ids=t.prompt_token_ids,
                timings=timings,
                nodes=Nodes(prefill=t.prefill_node, decode=t.decode_node),
            ),
        )
        if self.metrics:
            self.metrics.request_finished(
                t.client_id, reason, timings.ttft_s or 0.0, timings.tpot_s
            )

    def _fail(self, t: Tracked, exc: Exception, *, release: bool) -> None:
        if release:
            self._release_everywhere(t)
        self.events.record(str(t.rid), "failed", t=self.now)
        reply = error_from_exception(t.request_id, exc)
        self._reply(t.identity, reply)
        if self.metrics:
            self.metrics.request_failed(t.client_id, reply.code)

    def _release_everywhere(self, t: Tracked) -> None:
        """Forgets ``t`` and frees whatever any node holds of it."""
        if t.phase is Phase.DONE:
            return
        self._leave_prefill_backlog(t)
        if t.phase is Phase.QUEUED:
            self.pools.prefill.remove(t)
        elif t.phase is Phase.WAITING_DECODE:
            self.pools.decode.remove(t)
        # (a node named twice is released once: the second time it holds t no more)
        for name in (
            t.prefill_node if t.phase is Phase.PREFILLING else None,
            t.kv_node,
            t.decode_node if t.phase is Phase.DECODING else None,
        ):
            node = self.nodes.get(name) if name else None
            if node is not None and t.rid in node.requests:
                node.requests.discard(t.rid)
                if node.alive:
                    self._send_node(node, Release(rid=t.rid))
        self.pools.prefill.on_finished(t)
        self.pools.decode.on_finished(t)
        t.phase = Phase.DONE
        self.requests.pop(t.rid, None)
        self.by_client_key.pop((t.identity, t.request_id), None)
        left = self.in_flight_per_client.get(t.client_id, 1) - 1
        if left > 0:
            self.in_flight_per_client[t.client_id] = left
        else:
            self.in_flight_per_client.pop(t.client_id, None)

    def _timings(self, t: Tracked) -> Timings:
        end = t.finished_at or self.now
        ttft = t.first_token_at - t.arrival_time if t.first_token_at else None
        n = t.num_output_tokens
        tpot = (end - t.first_token_at) / (n - 1) if t.first_token_at and n > 1 else None
        queue = t.dispatched_at - t.arrival_time if t.dispatched_at else None
        return Timings(
            queue_s=queue,
            ttft_s=ttft,
            tpot_s=tpot,
            kv_transfer_s=t.transfer_s,
            total_s=end - t.arrival_time,
        )
